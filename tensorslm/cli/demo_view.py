"""The demo's live terminal view: plain data in, a rich renderable out.

Kept apart from the demo's plumbing so it can be tested by rendering to a string.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from rich.console import Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text


@dataclass
class QueryRow:
    prompt: str
    answer: str = ""
    outcome: str = "waiting"
    output_tokens: int | None = None
    seconds: float | None = None
    joules: float | None = None
    method: str | None = None
    point: str | None = None
    rung: str | None = None


@dataclass
class SwitchRow:
    at: float          # seconds since the demo started
    from_point: str
    to_point: str
    reason: str


@dataclass
class DemoState:
    """Everything the view shows. Threads update it under ``lock``."""

    title: str = "tensorslm demo"
    battery_percent: float | None = None
    watts: float | None = None
    point: str | None = None
    rung: str | None = None
    queries: list[QueryRow] = field(default_factory=list)
    switches: list[SwitchRow] = field(default_factory=list)
    note: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render(state: DemoState, max_rows: int | None = 8, *, wrap: bool = False) -> Panel:
    """The panel: battery, point, the queries (the last ``max_rows``; ``None``: all) and the
    last switches. ``wrap`` folds long prompts and answers onto more lines instead of clipping
    them (for a log or a pipe, where the panel is printed once and must be readable)."""
    with state.lock:
        battery = state.battery_percent
        header = Table.grid(padding=(0, 2))
        header.add_column()
        header.add_column()
        header.add_column()
        bar = ProgressBar(total=100, completed=battery or 0, width=24,
                          complete_style="green" if (battery or 0) > 40 else
                          "yellow" if (battery or 0) > 15 else "red")
        header.add_row(Text(f"battery {_fmt(battery, '5.1f', '%')}"), bar,
                       Text.assemble(f"draw {_fmt(state.watts, '.2f', ' W')}   point ",
                                     (state.point or "–", "bold"), f" (rung {state.rung or '–'})"))

        queries = Table(expand=True, show_edge=False, header_style="bold")
        text_cell = {"overflow": "fold"} if wrap else {"no_wrap": True, "overflow": "ellipsis"}
        for name, kwargs in [("#", {"justify": "right", "min_width": 2}), ("prompt", {"ratio": 2}),
                             ("answer", {"ratio": 3}), ("tok", {"justify": "right"}),
                             ("s", {"justify": "right"}), ("energy", {"justify": "right"}),
                             ("point", {})]:
            cell = text_cell if name in ("prompt", "answer") else {"no_wrap": True}
            queries.add_column(name, **cell, **kwargs)
        start = 0 if max_rows is None else max(0, len(state.queries) - max_rows)
        for index, row in enumerate(state.queries[start:], start=start + 1):
            energy = "–" if row.joules is None else f"{row.joules:.2f} J"
            answer = row.answer if row.outcome in ("ok", "streaming") else f"[{row.outcome}] {row.answer}"
            prompt, answer = " ".join(row.prompt.split()), " ".join(answer.split())
            if not wrap:
                prompt, answer = _clip(prompt, 40), _clip(answer, 60)
            # Text cells: model output may contain [brackets] that rich would read as markup.
            cells = [str(index), prompt, answer, _fmt(row.output_tokens, "d"),
                     _fmt(row.seconds, ".1f"), energy, row.point or "–"]
            queries.add_row(*(Text(cell) for cell in cells))
        methods = sorted({row.method for row in state.queries if row.method})
        caption = Text(f"energy per query, method: {', '.join(methods) or '–'}", style="dim")

        switches = Text()
        for sw in state.switches[-4:]:
            switches.append(f"t+{sw.at:5.1f}s  {sw.from_point} → {sw.to_point}  ({sw.reason})\n")
        if not state.switches:
            switches.append("no operating-point switch yet\n", style="dim")

        parts = [Text(state.title, style="bold"), header, queries, caption,
                 Panel(switches, title="operating-point switches", border_style="dim")]
        if state.note:
            parts.append(Text(state.note, style="dim"))
        return Panel(Group(*parts), border_style="cyan")
