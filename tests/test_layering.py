"""The layering of SPEC §3, read from the source: models <- strategies <- app <- simulations,
and no strategy module imports another (what strategies share lives in base.py / wire.py)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = {"base", "wire", "client_eval"}          # modules every strategy may use
OWN_HELPERS = {"mggan": {"mggan_rules"}}          # a strategy's own math module


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from strategies import wire`` -> strategies.wire)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_strategy_module_imports_another():
    strategies = {p.stem for p in (ROOT / "strategies").glob("*.py")} - {"__init__"}
    for path in sorted((ROOT / "strategies").glob("*.py")):
        allowed = SHARED | OWN_HELPERS.get(path.stem, set()) | {path.stem}
        used = {m.split(".")[1] for m in imported_modules(path) if m.startswith("strategies.")}
        wrong = (used & strategies) - allowed
        assert not wrong, f"strategies/{path.name} imports {sorted(wrong)}"


def test_imports_point_one_way():
    below = {"models": {"strategies", "app", "simulations", "flwr"}, "strategies": {"app", "simulations"},
             "app": {"simulations"}}
    for layer, forbidden in below.items():
        for path in sorted((ROOT / layer).glob("*.py")):
            tops = {m.split(".")[0] for m in imported_modules(path)}
            assert not tops & forbidden, f"{layer}/{path.name} imports {sorted(tops & forbidden)}"


def test_simulations_go_through_flwr_run_not_the_deprecated_in_process_api():
    """Flower's ``run_simulation`` is deprecated: every simulation -- the scripts and the tests --
    goes through ``flwr run`` and the Simulation Engine (app/simulation.py)."""
    for layer in ("models", "strategies", "app", "simulations", "tests"):
        for path in sorted((ROOT / layer).glob("*.py")):
            used = {m for m in imported_modules(path) if m.endswith(("run_simulation", "_run_simulation"))}
            assert not used, f"{layer}/{path.name} imports {sorted(used)}"
