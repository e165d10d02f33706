"""The ablation study's CI mode on a slice of Fashion-MNIST, its verdicts, and the plots' axes."""
import json
import math

import pytest

from bench import ablations
from model.plots import run_figure, study_figure

STATUSES = {"held", "partly", "not held", "within noise"}


@pytest.fixture(scope="module")
def study(fmnist_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations")
    return ablations.main(["--ci", "--data", str(fmnist_slice), "--out", str(out)]), out


def test_ci_study_writes_table_and_plots(study):
    result, out = study
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == [v.key for v in ablations.VARIANTS]
    for name in ("ablations.md", "ablations.json", "ablations.csv", "ablations.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "ablations.md").read_text()
    for v in ablations.VARIANTS:
        assert v.name in table and v.source in table and (out / "runs" / v.key / "curves.png").exists()
        assert rows[v.key]["status"] in STATUSES and rows[v.key]["why"]
    saved = json.loads((out / "ablations.json").read_text())
    assert [r["key"] for r in saved["rows"]] == list(rows) and "curve" not in saved["rows"][0]["measured"]
    assert len((out / "ablations.csv").read_text().splitlines()) == 1 + len(rows)


def test_ci_study_measures_real_runs(study):
    result, _ = study
    m = {r["key"]: r["measured"] for r in result["rows"]}
    # 18 steps already show the direction of paper Fig. 2: without stop-gradient the views agree more
    assert m["no-stop-grad"]["final_loss"] < m["default"]["final_loss"] - 0.1
    assert m["default"]["warning_step"] is None and m["default"]["z_std_ratio"] > 0.65
    assert all(m[k]["steps"] == 18 and 0 <= m[k]["knn_final"] <= 100 for k in m)
    assert m["cross-entropy"]["final_loss"] > 0  # a cross-entropy, not a negative cosine


def measured(final_loss, ratio, warning, knn_init, knn_final, steps=240):
    return {"final_loss": final_loss, "z_std_ratio": ratio, "warning_step": warning, "knn_init": knn_init,
            "knn_final": knn_final, "steps": steps}


def test_verdicts_say_what_held():
    default = measured(-0.7, 0.99, None, 30.0, 50.0)
    assert ablations.verdict("default", default, default, 10.0, 1.0)[0] == "held"
    assert ablations.verdict("default", measured(-0.9, 0.4, 80, 30.0, 31.0), None, 10.0, 1.0)[0] == "not held"
    status, why = ablations.verdict("no-stop-grad", measured(-0.9, 0.37, 80, 30.0, 38.0), default, 10.0, 1.0)
    assert status == "partly" and "28 points above chance" in why
    assert ablations.verdict("identity-predictor", measured(-0.99, 0.05, 40, 30.0, 11.0), default, 10.0, 1.0)[0] == "held"
    assert ablations.verdict("identity-predictor", measured(-0.7, 0.9, None, 30.0, 45.0), default, 10.0, 1.0)[0] == "not held"
    assert ablations.verdict("fixed-predictor", measured(-0.3, 0.9, None, 30.0, 33.0), default, 10.0, 1.0)[0] == "held"
    assert ablations.verdict("fixed-predictor", measured(-0.6, 0.9, None, 30.0, 48.0), default, 10.0, 1.0)[0] == "not held"
    assert ablations.verdict("pred-lr-decayed", measured(-0.7, 0.9, None, 30.0, 50.5), default, 10.0, 1.0)[0] == "within noise"
    assert ablations.verdict("pred-lr-decayed", measured(-0.7, 0.9, None, 30.0, 47.0), default, 10.0, 1.0)[0] == "held"
    assert ablations.verdict("asymmetric", measured(-0.7, 0.9, None, 30.0, 46.0), default, 10.0, 1.0)[0] == "held"
    assert ablations.verdict("cross-entropy", measured(7.0, 0.9, None, 30.0, 32.0), default, 10.0, 1.0)[0] == "not held"


def test_noise_is_two_standard_errors_of_a_difference():
    assert ablations.noise_points(50.0, 1000) == pytest.approx(2 * math.sqrt(2) * 100 * math.sqrt(0.25 / 1000))
    assert ablations.noise_points(99.9, 100000) == 1.0  # never under a point


def test_unknown_variant_is_refused(capsys):
    with pytest.raises(SystemExit):
        ablations.parse_args(["--variants", "default,momentum"])
    assert "unknown variant(s) momentum" in capsys.readouterr().err


def test_plots_have_whole_epoch_ticks_and_the_healthy_z_std_line():
    dim, per_epoch = 256, 10
    curve = [[s, -s / 40, 1 / math.sqrt(dim) * (1 - s / 60)] for s in range(1, 31)]
    history = [{"epoch": 0, "knn_top1": 20.0, "probe_top1": 25.0}] + \
              [{"epoch": e, "loss": -0.5, "knn_top1": 20.0 + e, "probe_top1": 25.0 + e} for e in (1, 2, 3)]
    for fig in (run_figure(history, curve, dim, warning_step=25),
                study_figure({"a": {"history": history, "curve": curve, "warning_step": 25}}, dim)):
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
            assert ax.get_xlabel().startswith("epoch")
        z_panel = fig.axes[1]
        levels = [line.get_ydata()[0] for line in z_panel.get_lines() if len(set(line.get_ydata())) == 1]
        assert 1 / math.sqrt(dim) in levels and z_panel.get_ylim()[0] == 0
        assert max(x for line in z_panel.get_lines() for x in line.get_xdata()) == pytest.approx(30 / per_epoch)
