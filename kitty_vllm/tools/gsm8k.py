"""GSM8K, 8-shot chain of thought: the prompt and the answer check.

The eight exemplars are the standard chain-of-thought ones (Wei et al., 2022, "Chain-of-Thought
Prompting Elicits Reasoning in Large Language Models", Table 20), the prompt of lm-eval's
``gsm8k_cot`` task: ``Q: <question>\\nA: <reasoning> The answer is <n>.`` blocks separated by a blank
line, then the test question and ``A:``. Generation is greedy and stops at the next ``Q:``.

A completion is right when its final number equals the reference's (the number after ``####`` in
the GSM8K solution). The final number is the one after the last "The answer is", or, if the model
never says that, the last number it wrote (lm-eval's "flexible extract").
"""

from __future__ import annotations

import re
from fractions import Fraction

EXEMPLARS = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they "
     "are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there "
     "must have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking "
     "lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left "
     "in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
     "eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many "
     "lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
     "20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys "
     "does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more "
     "toys. 5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from "
     "monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = "
     "20 computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How "
     "many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After "
     "losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has "
     "23 - 15 dollars left. 23 - 15 is 8. The answer is 8."),
)

STOP = ("Q:",)
MAX_NEW_TOKENS = 256

_FEW_SHOT = "".join(f"Q: {question}\nA: {answer}\n\n" for question, answer in EXEMPLARS)
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")
_ANSWER_IS = re.compile(r"The answer is\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)


def prompt(question: str) -> str:
    """The 8-shot chain-of-thought prompt for one test question (shared prefix, then the question)."""
    return f"{_FEW_SHOT}Q: {question.strip()}\nA:"


def reference_answer(solution: str) -> str:
    """The final number of a GSM8K solution (``... #### 1,234``), without separators."""
    marker = solution.rfind("####")
    if marker < 0:
        raise ValueError(f"a GSM8K solution ends in '#### <number>'; got {solution[-80:]!r}")
    return solution[marker + 4:].strip().replace(",", "")


def final_number(completion: str) -> str | None:
    """The number a completion gives as its answer (module docstring), or None if it has none."""
    stated = _ANSWER_IS.findall(completion)
    if stated:
        return stated[-1]
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def is_correct(completion: str, solution: str) -> bool:
    """Whether the completion's final number equals the solution's (as numbers: ``18.00 == 18``)."""
    answer = final_number(completion)
    if answer is None:
        return False
    try:
        return Fraction(answer.replace(",", "")) == Fraction(reference_answer(solution))
    except (ValueError, ZeroDivisionError):
        return False
