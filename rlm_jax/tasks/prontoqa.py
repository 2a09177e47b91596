"""PrOntoQA (fictional ontology, modus ponens, relevant distractors) in x1's format
(x1: synthetic_generation/prontoqa.py, which wraps asaparov/prontoqa).

Problem text (x1's layout: "Q: " + axioms + "\\n" + query + "\\n\\nA: "):

    Q: Lorpuses are not sweet. Shumpuses are not bright. Each impus is bright. Every shumpus is a
    lempus. Each shumpus is a zumpus. Max is a lorpus. Max is a shumpus.
    True or false: Max is not bright.

    A: 

Sentences: rules "Every/Each X is [not] (a Y | adj)." or "Xs are [not] (Ys | adj).", facts
"Max is [not] (a Y | adj).". Record: type "ProntoQA", unique_solution True, solution "True"/"False"
(strings, as x1).

Difficulty d gives `2 + int(5d)` deduction steps, counted as x1/PrOntoQA count them: the entity's
starting fact plus one modus ponens per step after it. Distractors as in PrOntoQA's "relevant" mode:
every concept on the proof path has a second parent, the entity is also a member of an unrelated
concept, and a rule on an unrelated concept states the opposite of the conclusion.

Reference trace (one deduction per step, then the answer):

    Max is a shumpus.
    Every shumpus is a lempus. So Max is a lempus.
    Lempuses are bright. So Max is bright.
    The answer is False.

`verify` scores the last "true"/"false" of the output, as x1 does, except that the query's "True or
false" phrase is not an answer (`base.last_bool`): echoing the question, or no answer, is INVALID.
`check_partial` reads each step's sentences: a rule must be an axiom; a fact must be an axiom,
already stated, or follow by modus ponens from an axiom rule and an axiom or stated fact; the answer
must be correct and its query (or its negation) already stated. A violation is INCORRECT, an
unreadable sentence INVALID. Any valid prefix can be extended to the proof, so `can_succeed`
(= no violation) is exact.
"""
from __future__ import annotations

import functools
import random
import re
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from rlm_jax.tasks.base import AnswerTask, Capabilities, Problem, Score, as_record, difficulty_to_level, last_bool, task_rng

NAME = "ProntoQA"
# Fictional concept nouns (singular; plural adds "es").
CONCEPTS = ("wumpus", "yumpus", "zumpus", "dumpus", "rompus", "numpus", "tumpus", "vumpus", "impus", "jompus",
            "gorpus", "shumpus", "lempus", "sterpus", "grimpus", "lorpus", "brimpus", "timpus", "yimpus",
            "rempus", "fompus", "terpus", "gerpus", "kerpus", "bompus", "jelpus", "felpus", "chorpus")
# Each rule uses its own family, so no two rules can contradict each other by accident.
ADJECTIVE_FAMILIES = (
    ("blue", "red", "brown", "orange"), ("small", "large"), ("metallic", "wooden", "luminous", "liquid"),
    ("transparent", "opaque"), ("nervous", "happy", "feisty", "shy"), ("bright", "dull"),
    ("sweet", "sour", "spicy", "bitter"), ("floral", "fruity", "earthy"), ("hot", "cold", "temperate"),
    ("kind", "mean", "angry", "amenable", "aggressive"), ("melodic", "muffled", "discordant", "loud"),
    ("slow", "moderate", "fast"), ("windy", "sunny", "overcast", "rainy", "snowy"))
ADJECTIVES = frozenset(a for fam in ADJECTIVE_FAMILIES for a in fam)
ENTITIES = ("Fae", "Rex", "Sally", "Max", "Alex", "Sam", "Polly", "Stella", "Wren")
PROPERTY_QUESTION_P = 2 / 3  # Share of questions about an adjective rather than a concept.

Literal = tuple[str, bool]  # (predicate, positive); predicates are singular nouns or adjectives.
Rule = tuple[str, Literal]  # Every <antecedent noun> is <literal>.
Fact = tuple[str, Literal]  # <entity> is <literal>.

_CONNECTIVE = re.compile(r"^(?:so|thus|therefore|hence|then|and)\b,?\s*", re.IGNORECASE)
_SING_RULE = re.compile(r"^(?:every|each|all)\s+(\w+)\s+is\s+(not\s+)?(?:(an?)\s+)?(\w+)$", re.IGNORECASE)
_PLUR_RULE = re.compile(r"^(?:all\s+)?(\w+)\s+are\s+(not\s+)?(\w+)$", re.IGNORECASE)
_FACT = re.compile(r"^([A-Z]\w*)\s+is\s+(not\s+)?(?:(an?)\s+)?(\w+)$")
_ANSWER = re.compile(r"^(?:the\s+)?(?:final\s+)?(?:answer\s*(?:is)?\s*:?\s*)?(true|false)$", re.IGNORECASE)
_QUERY = re.compile(r"true or false:\s*(?P<q>[^\n]*?)\s*$", re.IGNORECASE | re.MULTILINE)


def plural(noun: str) -> str:
    return noun + "es" if noun.endswith(("s", "sh", "ch", "x")) else noun + "s"


def singular(word: str) -> str:
    if word.endswith(("ses", "shes", "ches", "xes")):
        return word[:-2]
    return word[:-1] if word.endswith("s") else word


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def _object(lit: Literal, plural_form: bool) -> str:
    pred, positive = lit
    neg = "" if positive else "not "
    if pred in ADJECTIVES:
        return neg + pred
    return neg + (plural(pred) if plural_form else f"{_article(pred)} {pred}")


def render_rule(rule: Rule, rng: random.Random) -> str:
    """PrOntoQA's surface forms: plural ("Xs are ...") or singular with each/every, picked at random."""
    ante, lit = rule
    if rng.random() < 0.5:
        text = f"{plural(ante)} are {_object(lit, True)}"
    else:
        text = f"{rng.choice(('Each', 'Every'))} {ante} is {_object(lit, False)}"
    return text[0].upper() + text[1:] + "."


def render_fact(fact: Fact) -> str:
    entity, lit = fact
    return f"{entity} is {_object(lit, False)}."


def _split_sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def parse_sentence(sentence: str):
    """('rule', Rule) | ('fact', Fact) | ('answer', bool) | None for one sentence."""
    s = _CONNECTIVE.sub("", sentence.strip().rstrip(".!").strip())
    if m := _ANSWER.match(s):
        return "answer", m.group(1).lower() == "true"
    if m := _SING_RULE.match(s):
        pred = m.group(4).lower()
        if not m.group(3) and pred not in ADJECTIVES:
            return None
        return "rule", (m.group(1).lower(), (pred, not m.group(2)))
    if m := _PLUR_RULE.match(s):
        obj = m.group(3).lower()
        pred = obj if obj in ADJECTIVES else singular(obj)
        return "rule", (singular(m.group(1).lower()), (pred, not m.group(2)))
    if m := _FACT.match(s):
        pred = m.group(4).lower()
        if not m.group(3) and pred not in ADJECTIVES:
            return None
        return "fact", (m.group(1), (pred, not m.group(2)))
    return None


def negate(lit: Literal) -> Literal:
    return lit[0], not lit[1]


@dataclass(frozen=True)
class Theory:
    rules: frozenset          # of Rule
    premises: tuple           # of Fact, in text order
    query: Fact
    sentences: dict           # logical form -> its sentence in the problem text


@functools.lru_cache(maxsize=4096)  # Pure; search re-checks steps of the same problem many times.
def parse_problem(text: str) -> Theory:
    """Parses x1's (or our) problem text. Raises ValueError."""
    q = _QUERY.search(text)
    if q is None:
        raise ValueError("no 'True or false:' query in ProntoQA problem")
    body = re.sub(r"^\s*Q:\s*", "", text[:q.start()])
    rules, premises, sentences = set(), [], {}
    for sentence in _split_sentences(body):
        parsed = parse_sentence(sentence)
        if parsed is None or parsed[0] == "answer":
            raise ValueError(f"cannot parse axiom {sentence!r}")
        kind, form = parsed
        (rules.add(form) if kind == "rule" else premises.append(form))
        sentences.setdefault(form, sentence)
    query = parse_sentence(q.group("q"))
    if query is None or query[0] != "fact":
        raise ValueError(f"cannot parse query {q.group('q')!r}")
    return Theory(frozenset(rules), tuple(premises), query[1], sentences)


def one_step(theory: Theory, fact: Fact, known) -> bool:
    """Whether `fact` is known, an axiom, or follows by one modus ponens from an axiom rule and a
    known fact."""
    entity, lit = fact
    return fact in known or fact in theory.premises or any(
        cons == lit and (entity, (ante, True)) in known for ante, cons in theory.rules)


def derivations(theory: Theory) -> dict:
    """Every derivable fact -> (parent fact, rule), None for premises; breadth first, so parent
    chains are shortest proofs."""
    by_ante: dict = {}
    for ante, cons in theory.rules:
        by_ante.setdefault(ante, []).append((ante, cons))
    parent = {f: None for f in theory.premises}
    queue = deque(theory.premises)
    while queue:
        fact = queue.popleft()
        entity, (pred, positive) = fact
        for rule in (by_ante.get(pred, []) if positive else []):
            new = (entity, rule[1])
            if new not in parent:
                parent[new] = (fact, rule)
                queue.append(new)
    return parent


def answer_of(theory: Theory) -> bool:
    """True if the query is provable, False if its negation is. Raises ValueError otherwise."""
    known = derivations(theory)
    entity, lit = theory.query
    yes, no = theory.query in known, (entity, negate(lit)) in known
    if yes == no:
        raise ValueError("query is " + ("contradictory" if yes else "undetermined"))
    return yes


def proof(theory: Theory) -> list[tuple[Fact, Rule | None]]:
    """Shortest chain from a premise to the query or its negation: [(fact, rule used or None)]."""
    known = derivations(theory)
    entity, lit = theory.query
    goal = theory.query if theory.query in known else (entity, negate(lit))
    chain = []
    while goal is not None:
        step = known[goal]
        chain.append((goal, None if step is None else step[1]))
        goal = None if step is None else step[0]
    return chain[::-1]


def random_theory(rng: random.Random, num_steps: int) -> tuple[list[Rule], list[Fact], Fact, bool]:
    """Rules, premises, query and answer with a proof of exactly `num_steps` steps (see module doc)."""
    hops = num_steps - 1
    nouns = rng.sample(CONCEPTS, len(CONCEPTS))
    families = rng.sample(ADJECTIVE_FAMILIES, len(ADJECTIVE_FAMILIES))
    entity = rng.choice(ENTITIES)

    def new_property() -> Literal | None:
        return (rng.choice(families.pop()), rng.random() < 0.5) if families else None

    about_property = rng.random() < PROPERTY_QUESTION_P
    chain = [nouns.pop() for _ in range(hops if about_property else hops + 1)]
    rules: list[Rule] = [(chain[i], (chain[i + 1], True)) for i in range(len(chain) - 1)]
    conclusion = new_property() if about_property else (chain[-1], True)
    if about_property:
        rules.append((chain[-1], conclusion))
    for concept in chain[:hops]:  # A second parent at every hop, so each step is a choice.
        parent = nouns.pop()
        rules.append((concept, (parent, True)))
        if rng.random() < 0.5 and (prop := new_property()):
            rules.append((parent, prop))
    for concept in chain:
        if rng.random() < 0.5 and (prop := new_property()):
            rules.append((concept, prop))
    decoy, decoy_parent, contrary = nouns.pop(), nouns.pop(), nouns.pop()
    rules.append((decoy, (decoy_parent, True)))
    if prop := new_property():
        rules.append((decoy_parent, prop))
    rules.append((contrary, negate(conclusion)))  # Tempting, but the entity is no `contrary`.
    premises = [(entity, (chain[0], True)), (entity, (decoy, True))]
    rng.shuffle(rules)
    rng.shuffle(premises)
    answer = rng.random() < 0.5
    query = (entity, conclusion if answer else negate(conclusion))
    return rules, premises, query, answer


class ProntoQATask(AnswerTask):
    """PrOntoQA; see the module docstring for text, answer and trace formats."""

    name = NAME
    # Valid steps only add true facts, so any valid prefix extends to the proof and answer: the base
    # `can_succeed` (no violation so far) is exact.
    capabilities = Capabilities(exact_labels=True)

    def generate(self, seed: int, difficulty: float) -> Problem:
        level = difficulty_to_level(difficulty)
        num_steps = 2 + int(5 * difficulty)
        rng = task_rng(NAME, seed, difficulty)
        rules, premises, query, answer = random_theory(rng, num_steps)
        axioms = " ".join([render_rule(r, rng) for r in rules] + [render_fact(f) for f in premises])
        text = f"Q: {axioms}\nTrue or false: {render_fact(query)}\n\nA: "
        theory = parse_problem(text)
        if answer_of(theory) != answer or len(proof(theory)) != num_steps:
            raise AssertionError("generated ProntoQA theory does not have the planned proof")  # A bug.
        return as_record(NAME, level, text, True, str(answer),
                         meta={"num_deduction_steps": num_steps, "entity": query[0]})

    def read_answer(self, output: str) -> bool | None:
        return last_bool(output)

    def reference_answer(self, problem: Problem) -> bool:
        return answer_of(parse_problem(problem["problem"]))

    def solve(self, problem: Problem) -> list[str]:
        theory = parse_problem(problem["problem"])
        steps = []
        for fact, rule in proof(theory):
            said = render_fact(fact)
            steps.append(said if rule is None else f"{theory.sentences[rule]} So {said}")
        return steps + [f"The answer is {answer_of(theory)}."]

    def check_partial(self, problem: Problem, steps: Sequence[str]) -> Score:
        theory = parse_problem(problem["problem"])
        entity, lit = theory.query
        truth = answer_of(theory)
        known: set = set(theory.premises)  # Axioms may be used without restating them.
        stated: set = set()
        answered = False
        for step in steps:
            sentences = _split_sentences(step)
            if not sentences:
                return Score.INVALID
            for sentence in sentences:
                parsed = parse_sentence(sentence)
                if parsed is None:
                    return Score.INVALID
                kind, form = parsed
                if kind == "rule" and form not in theory.rules:
                    return Score.INCORRECT
                if kind == "fact":
                    if not one_step(theory, form, known):
                        return Score.INCORRECT
                    known.add(form)
                    stated.add(form)
                if kind == "answer":
                    proved = theory.query in stated or (entity, negate(lit)) in stated
                    if form != truth or not proved:
                        return Score.INCORRECT
                    answered = True
        return Score.SOLVED if answered else Score.PARTIAL
