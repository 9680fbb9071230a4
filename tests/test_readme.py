"""README.md opens with the two commands a fresh machine runs; .ci/run runs exactly the second one."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_demo_and_test_commands():
    cmds = _readme_commands()
    assert len(cmds) >= 2
    assert "lowrank demo" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == _readme_commands()[1].strip()
