"""The repository stands alone: nothing names a folder beside it, the product opens no file outside its
own package (and the interpreter's), and a non-editable install runs the shipped experiments from any
directory."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cgpt_jax import experiment_files, reference
from experiments.cpu_ladder import sweep as ladder_sweep

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("standalone_probe.py")
SCANNED = ("cgpt_jax", "tests", "launch", "experiments", "docs", "README.md", "setup.py")
# A path into the folder beside the repository where the reference used to be read from.
OUTSIDE = re.compile(r"\.\./shared|shared/reference|parents\[\d+\]\s*/\s*[\"']shared")
SIZES = ["111M", "256M", "590M", "1.3B", "2.7B", "6.7B", "13B"]


def _scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        root = REPO / name
        found = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        files += [p for p in found if "__pycache__" not in p.parts and p != Path(__file__).resolve()]
    return files


def test_nothing_names_the_folder_beside_the_repository():
    files = _scanned_files()
    assert any(p.name == "reference.py" for p in files) and len(files) > 50  # the scan sees the product
    offenders = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not offenders, "\n".join(offenders)


def test_packaged_reference_holds_what_the_code_needs():
    data = reference.load()
    assert list(data["models"]) == SIZES
    for size in SIZES:
        model = data["models"][size]
        assert {"d_model", "n_layers", "n_heads", "training_flops_reported"} <= set(model), size
        assert data["pile_test_loss"]["SP_paper_and_modelzoo_readme"][size] > 1.0
    assert {k: data["scaling_laws"][0][k] for k in "abc"} == {"a": 5.984e22, "b": -0.0737, "c": 0.5066}
    assert set(data["mup"]["models"]) == {"111M", "256M", "590M", "1.3B", "2.7B"}
    assert data["downstream"]["zero_shot"] and data["downstream"]["tasks"]
    assert any("modelzoo" in source["url"] for source in data["sources"])  # the facts keep their sources
    assert data["schema_note"] and data["errata"]
    data["models"].clear()
    assert list(reference.load()["models"]) == SIZES  # each load is a fresh copy


def _probe(cwd: Path, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.read_text()], capture_output=True, text=True, check=False,
                         cwd=cwd, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def _check_probe(result: dict, root: Path) -> None:
    """Every file opened beyond the interpreter's lies under `root`, and the reference was among them."""
    root = Path(os.path.realpath(root))
    assert [p for p in result["opened"] if not Path(p).is_relative_to(root)] == []
    assert str(root / "cgpt_jax" / "reference" / reference.FILENAME) in result["opened"]  # the hook saw it
    assert Path(result["package"]).is_relative_to(root)
    assert result["experiment"] == str(root / experiment_files.SHIPPED_FOLDER / "cpu_ladder.py") or \
        result["experiment"] == str(root / "cgpt_jax" / "experiments" / "cpu_ladder.py")
    assert result["models"] == SIZES and result["fit_r2"] > 0.99
    assert result["runs"] == [run["name"] for run in ladder_sweep()]  # the shipped ladder, found by name elsewhere
    assert (result["config_d_model"], result["config_n_layers"]) == (32, 2)  # tiny, with the override
    assert result["template_has_train_command"]


def test_checkout_opens_nothing_outside_the_repository(tmp_path):
    """From another directory, the package as this checkout provides it (editable or on PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    _check_probe(_probe(tmp_path, env), REPO)


def test_non_editable_install_runs_shipped_experiments_from_anywhere(tmp_path):
    """A wheel built from a copy of the sources, installed into a bare target folder that is the only
    cgpt_jax on the path: the experiments, the reference and the templates all come from the install."""
    source, target, elsewhere = tmp_path / "source", tmp_path / "target", tmp_path / "elsewhere"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("cgpt_jax", "experiments"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    shutil.copy(REPO / "setup.py", source)
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--no-index", "--target", str(target), str(source)],
                             capture_output=True, text=True, check=False, timeout=300)
    assert install.returncode == 0, install.stderr
    shutil.rmtree(source)  # the install must not lean on the sources it was built from
    elsewhere.mkdir()
    result = _probe(elsewhere, {**os.environ, "PYTHONPATH": str(target)})
    _check_probe(result, target)
    assert result["experiment"] == str(target / "cgpt_jax" / "experiments" / "cpu_ladder.py")


def test_experiment_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = experiment_files.shipped_dir()
    assert experiment_files.resolve(Path("experiments/cpu_ladder.py")) == shipped / "cpu_ladder.py"
    assert experiment_files.resolve_spec("cerebras_gpt.py:size=tiny") == f"{shipped / 'cerebras_gpt.py'}:size=tiny"
    own = tmp_path / "experiments" / "cpu_ladder.py"  # a file that exists wins over the shipped one
    own.parent.mkdir()
    own.write_text("")
    assert experiment_files.resolve(Path("experiments/cpu_ladder.py")) == Path("experiments/cpu_ladder.py")
    for missing in ("other/cpu_ladder.py", "experiments/nope.py", str(tmp_path / "cpu_ladder.py"),
                    "experiments/__init__.py"):
        with pytest.raises(FileNotFoundError, match="shipped with cgpt_jax.*cpu_ladder.py, mup_transfer.py"):
            experiment_files.resolve(Path(missing))


def test_cli_reports_an_unknown_experiment(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cgpt_jax.plan", "--config=experiments/nope.py",
                          "--mesh=fsdp=1"], capture_output=True, text=True, check=False, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr  # refused input (docs/errors.md)
    assert "experiments/nope.py not found" in out.stderr
    assert all(name in out.stderr for name in ("cerebras_gpt.py", "cpu_bench.py", "cpu_ladder.py"))
