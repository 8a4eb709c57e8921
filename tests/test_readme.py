"""The README's commands refer to things that exist: every `socialmae` sub-command and option,
every `dvc exp run -S` key (with a value the params accept), every linked file. (The commands
themselves run in the tests named in the comments below and in `make demo`.)"""

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from socialmae.cli import app
from socialmae.data.sources.catalog import parse_download
from socialmae.data.stages import DataParams
from socialmae.params import from_mapping
from socialmae.train.pretrain import PretrainParams
from socialmae.train.stages import finetune_params, merged_section
from socialmae.train.tune import parse_tune

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> list[list[str]]:
    """Shell commands of the README's bash blocks, continuation lines joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                for part in re.split(r"\s&&\s", line):
                    commands.append(shlex.split(part))
    return commands


COMMANDS = _commands()


def _socialmae_calls() -> list[list[str]]:
    calls = [c[1:] for c in COMMANDS if c[0] == "socialmae"]
    for c in COMMANDS:  # torchrun ... -m socialmae.cli <args>
        if c[0] == "torchrun":
            calls.append(c[c.index("socialmae.cli") + 1 :])
    return calls


@pytest.mark.parametrize("args", _socialmae_calls(), ids=lambda a: " ".join(a[:2]))
def test_socialmae_commands_and_options_exist(args):
    group = typer.main.get_command(app)
    command = group.commands.get(args[0])  # type: ignore[attr-defined]
    assert command is not None, f"no sub-command {args[0]!r}"
    options = {o for p in command.params for o in getattr(p, "opts", [])}
    for arg in args[1:]:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in options, f"{args[0]} has no option {arg}"


def _set(params: dict, dotted: str, value) -> None:
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        assert isinstance(node.get(key), dict), f"params.yaml has no {dotted}"
        node = node[key]
    assert leaf in node or parents[:1] in (["download"], ["tune"], ["finetune"]), dotted
    node[leaf] = value


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if c[:3] == ["dvc", "exp", "run"]], ids=lambda c: c[-1]
)
def test_dvc_exp_run_overrides_are_valid_params(command):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for i, arg in enumerate(command):
        if arg == "-S":
            key, value = command[i + 1].split("=", 1)
            _set(params, key, yaml.safe_load(value))
    datasets = from_mapping(DataParams, params["data"], "data").datasets
    parse_download(params["download"], datasets)
    from_mapping(PretrainParams, params["pretrain"], "pretrain")
    for task in params["tasks"]:
        finetune_params(params, task, None)
        section = merged_section(params, "tune", task)
        section.pop("enabled", None)
        parse_tune(section, f"tune.{task}")


def test_linked_files_exist():
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link
    for path in ("flows/README.md", "notebooks/README.md", "prefect.yaml", "dvc.yaml"):
        assert path in README or (ROOT / path).exists()
