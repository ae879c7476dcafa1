"""The demo view shows what the state holds: battery, point, each query's energy with its method."""
from rich.console import Console

from tensorslm.cli.demo_view import DemoState, QueryRow, SwitchRow, render


def rendered(state: DemoState) -> str:
    console = Console(width=140, record=True, color_system=None)
    console.print(render(state))
    return console.export_text()


def test_view_shows_energy_with_method_and_switches():
    state = DemoState(battery_percent=63.2, watts=3.1, point="balanced", rung="tt-6x8")
    state.queries.append(QueryRow("What is the capital of France?", "Paris.", "ok", 3, 1.4, 2.31,
                                  "simulated", "top"))
    state.queries.append(QueryRow("Tell me more", "queue is full", "busy"))
    state.switches.append(SwitchRow(12.3, "top", "balanced", "battery below 60%"))
    text = rendered(state)
    assert "63.2%" in text and "3.10 W" in text and "balanced (rung tt-6x8)" in text
    assert "2.31 J" in text and "energy per query, method: simulated" in text
    assert "[busy] queue is full" in text
    assert "top → balanced  (battery below 60%)" in text


def test_view_keeps_the_last_rows():
    state = DemoState()
    for i in range(12):
        state.queries.append(QueryRow(f"prompt number {i}"))
    text = rendered(state)
    assert "prompt number 11" in text and "prompt number 3" not in text
    assert "no operating-point switch yet" in text


def test_view_for_a_log_lists_every_prompt_whole_at_80_columns():
    """In a pipe or CI log the panel is printed once: every prompt, every answer and the title
    are there in full, wrapped rather than clipped, and the column headers are whole."""
    long_answer = "Paris is the capital and the largest city of France, on the Seine. " * 3
    state = DemoState(title="tensorslm demo: SmolLM2-135M-Instruct on a simulated raspberry-pi-4 "
                            "battery (6 Wh, time x120)", battery_percent=20.0, point="eco")
    for i in range(12):
        state.queries.append(QueryRow(f"prompt number {i}: what is the capital of France, please?",
                                      long_answer, "ok", 32, 2.5, 4.21, "simulated", "eco"))
    console = Console(width=80, record=True, color_system=None)
    console.print(render(state, max_rows=None, wrap=True))
    text = console.export_text()
    assert "…" not in text
    assert text.count("prompt number") == 12 and text.count("France, please?") == 12
    assert text.count("Seine.") == 36                        # every answer whole
    assert "(6 Wh, time x120)" in text
    header = next(line for line in text.splitlines() if "prompt" in line and "answer" in line)
    for name in ("tok", "energy", "point"):
        assert name in header, header
    assert max(len(line) for line in text.splitlines()) <= 80
