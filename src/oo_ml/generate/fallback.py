"""Curated fallback tips, and the content checks a model's output must pass.

Owns:
- `CURATED`: a small table of hand-written tips keyed by situation (overdue tasks, many open
  tasks, no tasks, morning / afternoon / evening / night), and `pick_fallback`, which picks
  one deterministically from the context: the same context always gets the same tip, so a
  fallback is reproducible from the decision log;
- `check_output`: cleans a model's text and says why it is unusable, if it is. Reasons are
  the exact strings `Generation.fallback_reason` carries.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

from oo_ml.domain.features import Assembled
from oo_ml.generate.prompts import part_of_day

MANY_OPEN_TASKS = 8

CURATED: Mapping[str, tuple[str, ...]] = {
    "overdue": (
        "Pick the smallest overdue task and finish it first: one closed loop makes the rest "
        "feel lighter.",
        "Look at your overdue tasks and, for each one, either do it, reschedule it, or drop it.",
        "Give your oldest overdue task 15 focused minutes now, before anything new.",
    ),
    "many_open": (
        "Your list is long: choose the three tasks that matter most today and hide the rest.",
        "Batch the quick tasks on your list and clear them in one 20-minute sprint.",
        "Move anything you will not touch this week off today's list.",
    ),
    "no_tasks": (
        "Nothing open: write down the one outcome that would make today a good day.",
        "A clear list is a good moment to plan: add tomorrow's first task now.",
        "Use this quiet moment to tidy one small corner of your week ahead.",
    ),
    "morning": (
        "Start with the task you are most tempted to postpone, while your energy is high.",
        "Before opening messages, spend 25 minutes on your most important task.",
        "Decide now what would make today a success, and start there.",
    ),
    "afternoon": (
        "Afternoon dip? Pick a short, concrete task and finish it before taking a break.",
        "Check your plan for the day and adjust it to the time you really have left.",
        "Close one open loop now: a reply, a small fix, or a quick decision.",
    ),
    "evening": (
        "Wrap up: note where you left off so tomorrow starts without friction.",
        "Choose tomorrow's first task tonight, and leave everything else for later.",
        "Review what you finished today before planning anything new.",
    ),
    "night": (
        "It is late: write down the one thing to start with tomorrow, then call it a day.",
        "Rest is part of the plan. Park your open tasks until the morning.",
        "Jot down anything on your mind so it waits for you, not keeps you up.",
    ),
}


def situation(features: Assembled) -> str:
    f = features.values
    hour = int(f["hour_of_day"]) % 24
    if f["overdue_tasks"] >= 1:
        return "overdue"
    if f["open_tasks"] >= MANY_OPEN_TASKS:
        return "many_open"
    if f["open_tasks"] < 1:
        return "no_tasks"
    return part_of_day(hour)


def pick_fallback(features: Assembled) -> str:
    """The curated tip for this context; the same context always gets the same tip."""
    f = features.values
    key = situation(features)
    # The context, not the clock or the user, picks the tip: hashlib keeps it stable
    # across processes and restarts (hash() is salted per process).
    seed = "|".join(
        str(int(f[n])) for n in ("hour_of_day", "day_of_week", "open_tasks", "overdue_tasks")
    )
    digest = hashlib.sha256(f"{key}|{seed}".encode()).digest()
    tips = CURATED[key]
    return tips[int.from_bytes(digest[:4], "big") % len(tips)]


_SPACE = re.compile(r"\s+")
_QUOTES = "\"'`“”‘’«»"
_URL = re.compile(
    r"(?i)\b(?:https?://|ftp://|www\.)\S+"
    r"|\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|net|org|io|ai|app|dev|co|ly|me|info|biz)\b"
)
# Phrases a tip never needs and a model only writes when it talks about itself, refuses,
# or repeats injected instructions (task titles are user data and may try).
_ECHO = re.compile(
    r"(?i)\bas an ai\b|\blanguage model\b|\bi(?: a|')m (?:an? )?(?:ai|assistant)\b"
    r"|\bignore (?:all |any )?(?:the )?(?:previous|prior|above) instructions\b"
    r"|\bsystem prompt\b|\bi (?:cannot|can't|can not) (?:help|assist|comply)\b"
    r"|<\|[a-z_]+\|>|\[/?inst\]"
)


def clean_output(text: str) -> str:
    """One line, no surrounding whitespace or quotes."""
    flat = _SPACE.sub(" ", text).strip()
    return flat.strip(_QUOTES + " ")


def check_output(text: str, max_chars: int, echo_lines: Sequence[str] = ()) -> tuple[str, str]:
    """(cleaned text, "") when usable, else (cleaned text, fallback reason)."""
    cleaned = clean_output(text)
    if not cleaned:
        return cleaned, "empty output"
    if len(cleaned) > max_chars:
        return cleaned, "output too long"
    if any(not ch.isprintable() for ch in cleaned):
        return cleaned, "content check failed: non-printable characters"
    if _URL.search(cleaned):
        return cleaned, "content check failed: url"
    if "{" in cleaned or "}" in cleaned:
        return cleaned, "content check failed: template braces"
    if _ECHO.search(cleaned):
        return cleaned, "content check failed: assistant boilerplate"
    lowered = cleaned.lower()
    if any(line.lower() in lowered for line in echo_lines):
        return cleaned, "content check failed: prompt echo"
    return cleaned, ""
