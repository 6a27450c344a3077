"""The ``gamverify`` parser: every flag listed with its help, one-line errors with exit code 2, list and JSON flags
as a shell user types them. The commands themselves are faked where they would run a model."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pandas as pd
import pytest

from monai_gamverify import cli
from monai_gamverify.apps.cohort.command import cohort_parser
from monai_gamverify.apps.commandline import docstring_parts

#: commands whose signature another open change rewrites (issue #23: verify gets explicit parameters)
PENDING_KWARGS: set[str] = set()


def _commands():
    for name, target in cli.COMMANDS.items():
        if isinstance(target, dict):
            for sub, func in target.items():
                yield [name, sub], func
        else:
            yield [name], target


COMMANDS = list(_commands())
IDS = [" ".join(words) for words, _ in COMMANDS]


def _run(argv, capsys):
    """``gamverify ARGV`` in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("words, func", COMMANDS, ids=IDS)
def test_help_lists_every_flag_with_its_docstring(words, func, capsys):
    code, out, _ = _run([*words, "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    _, docs, _ = docstring_parts(func)
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        assert f"--{param.name}" in out, f"{' '.join(words)} --help does not list --{param.name}"
        if words[0] not in PENDING_KWARGS:
            assert docs.get(param.name), f"{func.__name__} documents no {param.name!r} under Args"
            first_words = " ".join(docs[param.name].replace("%%", "%").split()[:4])
            assert first_words in flat, f"--{param.name}: {first_words!r} not in the help"


@pytest.mark.parametrize("words, func", COMMANDS, ids=IDS)
def test_no_command_takes_bare_kwargs(words, func):
    if words[0] in PENDING_KWARGS:
        pytest.skip("verify's parameters are being made explicit by issue #23's verify rewrite")
    kinds = [p.kind for p in inspect.signature(func).parameters.values()]
    assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{func.__name__} takes **kwargs: --help cannot list them"


def test_top_level_help_lists_commands(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for name in [*cli.COMMANDS, *cli.PASSTHROUGH]:
        assert f"    {name}" in out


@pytest.mark.parametrize(
    "argv, expect",
    [
        (
            ["screen", "run", "--imagse", "a.nii.gz"],
            "unrecognized arguments: --imagse (did you mean --images?)",
        ),
        (["synth", "--n", "ten"], "argument --n: invalid int value: 'ten'"),
        (
            ["cam", "img.nii.gz", "--overrides", "{network_name: small_cnn}"],
            "argument --overrides: the value is not valid JSON",
        ),
        (["cam", "img.nii.gz", "--network_args", "[1, 2]"], "must be a JSON object"),
        (["demo", "--quick", "maybe"], "expected true or false"),
        (["screen"], "choose a command"),
        (["screen", "fit", "bundle_dir"], "missing DATASET_DIR"),
        (["nope"], "invalid choice: 'nope'"),
        (["energy", "a.csv", "b.csv", "--out_dir", "x"], "did you mean --out"),
    ],
)
def test_command_line_mistakes_are_one_error_line(argv, expect, capsys):
    code, out, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("ERROR: gamverify") and expect in lines[0], lines[0]
    assert "Traceback" not in err and out == ""


def test_library_value_error_is_one_line_and_traceback_on_request(capsys, monkeypatch):
    code, _, err = _run(["energy", "--out", "x"], capsys)  # neither an AE table nor a bundle
    assert code == 2 and err.count("\n") == 1 and err.startswith("ERROR: ValueError: give an AE CSV")
    monkeypatch.setenv("GAMVERIFY_TRACEBACK", "1")
    with pytest.raises(ValueError, match="give an AE CSV"):
        cli.main(["energy", "--out", "x"])


@pytest.fixture
def fake_run_screen(monkeypatch):
    import monai_gamverify.apps.screening as screening

    seen = {}

    def fake(screen, images, out, **kwargs):
        seen.update(screen=screen, images=list(images), out=out, **kwargs)
        df = pd.DataFrame({"image": images, "in_distribution": [True] * len(images)})
        df.attrs["dataset"] = {"like_training_data": True, "n_rejected": 0, "n": len(images), "expected_rate": 0.05,
                               "p_value": 1.0, "errors": []}  # fmt: skip
        return df

    monkeypatch.setattr(screening, "run_screen", fake)
    return seen


@pytest.mark.parametrize(
    "argv",
    [
        ["--screen", "scr", "--images", "a.nii.gz", "b.nii.gz"],  # space-separated, as a shell user types them
        ["--images", "a.nii.gz", "b.nii.gz", "--screen", "scr"],
        ["scr", "a.nii.gz", "b.nii.gz"],  # without the flags
        ["--screen", "scr", "--images", "[a.nii.gz, b.nii.gz]"],  # the old forms keep working
        ["--screen", "scr", "--images", "a.nii.gz,b.nii.gz"],
        ["--screen", "scr", "--images", '["a.nii.gz", "b.nii.gz"]'],
    ],
)
def test_screen_run_takes_space_separated_paths(argv, fake_run_screen, capsys):
    code, out, err = _run(["screen", "run", *argv, "--on_error", "raise"], capsys)
    assert code == 0, err
    assert fake_run_screen["images"] == ["a.nii.gz", "b.nii.gz"] and fake_run_screen["screen"] == "scr"
    assert fake_run_screen["on_error"] == "raise"
    assert out.startswith("2 image(s) screened, 0 out of distribution")


def test_screen_fit_forwards_lists_and_options(monkeypatch, capsys):
    """``--calibration_splits validation`` reaches fit_screen as a list of one split (not a string whose characters
    would be read as splits), and every fit_screen option has a flag."""
    import monai_gamverify.apps.screening as screening

    real_fit_screen = screening.fit_screen
    seen = {}

    class Fitted:
        n_fit_, n_cal_, detectors = 10, 20, ["intensity"]

    def fake(bundle_root, dataset_dir, out, overrides=None, alpha=0.05, **kwargs):
        seen.update(bundle_root=bundle_root, dataset_dir=dataset_dir, overrides=overrides, alpha=alpha, **kwargs)
        return Fitted()

    monkeypatch.setattr(screening, "fit_screen", fake)
    argv = ["screen", "fit", "bundles/sos", "data/sos", "--calibration_splits", "validation", "--overrides",
            '{"network_name": "small_cnn"}', "--calibration_dirs", "more_a", "more_b", "--combine", "maxz",
            "--alpha", "0.1", "--fit_splits", "training,extra"]  # fmt: skip
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert seen["calibration_splits"] == ["validation"] and seen["fit_splits"] == ["training", "extra"]
    assert seen["calibration_dirs"] == ["more_a", "more_b"] and seen["combine"] == "maxz" and seen["alpha"] == 0.1
    assert seen["overrides"] == {"network_name": "small_cnn"} and seen["bundle_root"] == "bundles/sos"
    assert "20 calibration images" in out
    fit_params = set(inspect.signature(real_fit_screen).parameters)
    assert fit_params <= set(inspect.signature(cli.screen_fit).parameters), "a fit_screen option without a flag"


def test_values_are_typed(monkeypatch, capsys):
    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return {"ok": 1}

    monkeypatch.setitem(cli.COMMANDS, "cam", fake)
    monkeypatch.setattr(fake, "__signature__", inspect.signature(cli.cam), raising=False)
    fake.__doc__ = cli.cam.__doc__
    argv = ["cam", "img.nii.gz", "--label", "2", "--class_idx", "1", "--box", "[[0, 10], [5, 20], [1, 2]]",
            "--network_args", '{"spatial_dims": 3}', "--a_min", "-1000"]  # fmt: skip
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert seen["image"] == "img.nii.gz" and seen["label"] == 2 and seen["class_idx"] == 1 and seen["a_min"] == -1000.0
    assert seen["box"] == [[0, 10], [5, 20], [1, 2]] and seen["network_args"] == {"spatial_dims": 3}
    assert seen["method"] is None  # the bundle's cam_method unless --method is given
    assert json.loads(out) == {"ok": 1}
    _run(["cam", "img.nii.gz", "--label", "spleen"], capsys)
    assert seen["label"] == "spleen"


def test_dict_flags_take_json_a_python_literal_or_a_json_file(monkeypatch, capsys, tmp_path):
    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)

    monkeypatch.setitem(cli.COMMANDS, "cam", fake)
    monkeypatch.setattr(fake, "__signature__", inspect.signature(cli.cam), raising=False)
    fake.__doc__ = cli.cam.__doc__
    (tmp_path / "o.json").write_text('{"network_name": "small_cnn", "roi": [16, 16]}')
    for value in ('{"network_name": "small_cnn", "roi": [16, 16]}', "{'network_name': 'small_cnn', 'roi': [16, 16]}",
                  str(tmp_path / "o.json")):  # fmt: skip
        assert _run(["cam", "x.nii.gz", "--overrides", value], capsys)[0] == 0
        assert seen["overrides"] == {"network_name": "small_cnn", "roi": [16, 16]}


def test_bool_flags(monkeypatch, capsys):
    import monai_gamverify.data.synthetic as synthetic

    seen = {}
    monkeypatch.setattr(synthetic, "synth", lambda **kw: seen.update(kw) or {})
    monkeypatch.setattr(synthetic, "summary_line", lambda s: "wrote")
    for flags, want in (
        ([], True),
        (["--progress"], True),
        (["--progress", "false"], False),
        (["--progress=no"], False),
    ):
        assert _run(["synth", "--n", "3", *flags], capsys)[0] == 0
        assert seen["progress"] is want and seen["n"] == 3


def test_cohort_seg_labels_and_deprecated_alias(capsys):
    ap = cohort_parser()
    assert ap.parse_args(["d", "--seg_labels", "spleen", "2"]).seg_labels == ["spleen", "2"]
    assert "WARNING" not in capsys.readouterr().err
    args = ap.parse_args(["d", "--labels", "liver"])
    assert args.seg_labels == ["liver"]
    assert "--labels is deprecated" in capsys.readouterr().err and "--seg_labels" in ap.format_help()
    with pytest.raises(SystemExit) as exc:
        ap.parse_args(["d", "--seg_label", "x"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("ERROR: gamverify cohort")


def test_python_dash_m_package_runs_the_command():
    res = subprocess.run([sys.executable, "-m", "monai_gamverify", "version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("monai-gamverify "), res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "monai_gamverify", "synth", "--kind"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("ERROR: "), res.stderr
