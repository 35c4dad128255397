"""``gradsign rank``: the user's data formats, the canonical batch, candidate loading, ranking, and one-line
errors for bad input. References: Pillow and numpy read the files directly, scipy ranks, gradsign.scores
scores a model built independently under the same seed."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import rankdata
from torch import nn

import gradsign
from gradsign.cli import main
from gradsign.rank import parse_image_size, rank, resolve_loss
from gradsign.userdata import UserDataError, balanced_indices, draw_batch, load_data

CLASS_COUNTS = {"owl": 3, "cat": 5, "dog": 4}  # folder order on disk is not class order: classes sort

CANDIDATES = '''
import torch
from torch import nn


def net(width, num_classes):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def candidates(num_classes, input_shape):
    assert input_shape == (3, 8, 8), input_shape
    return {
        "narrow": lambda: net(2, num_classes),
        "wide": lambda: net(16, num_classes),
        "instance": net(4, num_classes),
        "raises": lambda: 1 / 0,
        "wrong-input": lambda: nn.Linear(5, num_classes),
        "wrong-classes": lambda: net(4, 7),
        "not-a-model": lambda: "a string",
    }


def only_wide(num_classes):
    return {"wide": lambda: net(16, num_classes)}
'''


def net(width, num_classes):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name, count in CLASS_COUNTS.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{k}.png")
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    return root


@pytest.fixture
def cands(tmp_path):
    path = tmp_path / "cands.py"
    path.write_text(CANDIDATES)
    return path


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------- data formats and the batch
def test_image_folder_batch_is_the_pillow_pixels_with_sorted_class_indices(folder):
    data = load_data(folder)
    assert data.classes == ("cat", "dog", "owl") and len(data) == 12
    batch = draw_batch(data, 12, seed=3, normalize="none")
    assert batch.inputs.shape == (12, 3, 8, 8) and batch.num_outputs == 3
    for row, i in enumerate(batch.indices):
        path = data.files[i]
        expected = np.asarray(Image.open(path).convert("RGB"), np.float32).transpose(2, 0, 1) / 255
        np.testing.assert_allclose(batch.inputs[row].numpy(), expected, rtol=0, atol=1e-7)
        assert batch.targets[row] == ["cat", "dog", "owl"].index(path.parent.name)
    assert "3 classes" in batch.description and "seed 3" in batch.description


def test_greyscale_folder_gives_one_channel_and_resizing_works(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((6, 4), 200, np.uint8), mode="L").save(tmp_path / name / "x.png")
        Image.fromarray(np.full((5, 5), 10, np.uint8), mode="L").save(tmp_path / name / "y.bmp")
    with pytest.raises(UserDataError, match="differ in size"):
        draw_batch(load_data(tmp_path), 4, 0)
    batch = draw_batch(load_data(tmp_path, image_size=(3, 7)), 4, 0, normalize="none")
    assert batch.inputs.shape == (4, 1, 3, 7)
    assert sorted(batch.inputs.flatten().unique().tolist()) == pytest.approx([10 / 255, 200 / 255])


def test_balanced_draw_fills_from_the_other_classes_and_is_reproducible():
    codes = np.repeat([0, 1, 2], [50, 3, 20])
    for seed in range(5):
        picked = balanced_indices(codes, 30, np.random.default_rng(seed))
        counts = np.bincount(codes[picked], minlength=3)
        assert len(set(picked.tolist())) == 30 and counts[1] == 3  # the small class gives all it has
        assert abs(counts[0] - counts[2]) <= 1 and counts.sum() == 30
    a, b = (balanced_indices(codes, 30, np.random.default_rng(1)) for _ in range(2))
    assert (a == b).all()
    assert not (a == balanced_indices(codes, 30, np.random.default_rng(2))).all()
    few = balanced_indices(np.repeat(np.arange(10), 9), 7, np.random.default_rng(0))
    assert np.bincount(np.repeat(np.arange(10), 9)[few]).max() == 1  # 7 of 10 classes, one each


def test_normalisation_by_batch_statistics_given_values_and_dataset_constants(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (40, 3, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 4)
    data = load_data(tmp_path / "d.npz")
    raw = draw_batch(data, 16, 0, normalize="none")
    by_batch = draw_batch(data, 16, 0)
    pixels = x[raw.indices].astype(np.float64) / 255
    np.testing.assert_allclose(raw.inputs.numpy(), pixels, atol=1e-6)
    mean = pixels.mean(axis=(0, 2, 3), keepdims=True)
    std = pixels.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(by_batch.inputs.numpy(), (pixels - mean) / std, atol=1e-5)
    given = draw_batch(data, 16, 0, normalize="0.5/0.25")
    np.testing.assert_allclose(given.inputs.numpy(), (pixels - 0.5) / 0.25, atol=1e-5)
    cifar = draw_batch(data, 16, 0, normalize="cifar10")
    c10 = gradsign.datasets.dataset_info("cifar10")
    expected = (pixels - np.reshape(c10.mean, (1, 3, 1, 1))) / np.reshape(c10.std, (1, 3, 1, 1))
    np.testing.assert_allclose(cifar.inputs.numpy(), expected, atol=1e-5)
    with pytest.raises(UserDataError, match="2 values for 3 channels"):
        draw_batch(data, 16, 0, normalize="0.1,0.2/1")


def test_npz_targets_follow_the_loss(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=np.linspace(0, 1, 20))
    np.savez(tmp_path / "bin.npz", x=x, y=np.arange(20) % 2)
    reg = draw_batch(load_data(tmp_path / "reg.npz"), 8, 0, target_kind="values", normalize="none")
    assert reg.targets.shape == (8, 1) and reg.targets.dtype == torch.float32 and reg.num_outputs == 1
    np.testing.assert_array_equal(reg.inputs.numpy(), x[reg.indices])
    binary = draw_batch(load_data(tmp_path / "bin.npz"), 8, 0, target_kind="binary")
    assert binary.targets.shape == (8, 1) and sorted(binary.targets.flatten().tolist()) == [0.0] * 4 + [1.0] * 4
    with pytest.raises(UserDataError, match="not whole numbers"):
        draw_batch(load_data(tmp_path / "reg.npz"), 8, 0, target_kind="classes")
    np.savez(tmp_path / "bad.npz", x=x, z=x)
    with pytest.raises(UserDataError, match="'x' and 'y'"):
        load_data(tmp_path / "bad.npz")


class TokenClassifier(nn.Module):
    """Token ids -> Embedding -> mean over tokens -> Linear."""

    def __init__(self, vocab: int = 50, width: int = 8, classes: int = 3):
        super().__init__()
        self.embedding, self.hidden, self.head = nn.Embedding(vocab, width), nn.Linear(width, width), nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embedding(ids))).mean(1))


def test_npz_token_ids_reach_text_candidates_as_integers(tmp_path):
    # they were cast to float32 and normalised by the batch's statistics, so no text candidate (an
    # Embedding, or a transformers text config, which candidates build) could be scored
    ids = np.random.default_rng(0).integers(0, 50, (30, 8))
    np.savez(tmp_path / "tokens.npz", x=ids, y=np.arange(30) % 3)
    batch = draw_batch(load_data(tmp_path / "tokens.npz"), 12, 0)
    assert batch.inputs.dtype == torch.int64 and "token ids (int64), not normalised" in batch.description
    np.testing.assert_array_equal(batch.inputs.numpy(), ids[batch.indices])
    with pytest.raises(UserDataError, match="never normalised"):
        draw_batch(load_data(tmp_path / "tokens.npz"), 12, 0, normalize="0.5/0.25")
    result = rank({"tokens": TokenClassifier}, tmp_path / "tokens.npz", batch_size=12, seed=0)
    row = result.rows[0]
    assert row.error is None
    torch.manual_seed(0)
    assert row.scores["gradsign"] == gradsign.score(TokenClassifier(), batch.inputs, batch.targets)


def test_csv_features_and_target_column(tmp_path):
    lines = ["a,kind,b"] + [f"{i},{['setosa', 'virginica', 'versicolor'][i % 3]},{i * 0.5}" for i in range(12)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    data = load_data(tmp_path / "t.csv", target="kind")
    batch = draw_batch(data, 6, 0, normalize="none")
    assert batch.class_names == ("setosa", "versicolor", "virginica")
    assert np.bincount(batch.targets.numpy()).tolist() == [2, 2, 2]
    for row, i in enumerate(batch.indices):
        assert batch.inputs[row].tolist() == [float(i), i * 0.5]
        assert batch.class_names[int(batch.targets[row])] == lines[1 + i].split(",")[1]
    with pytest.raises(UserDataError, match="--target COLUMN"):
        load_data(tmp_path / "t.csv")
    (tmp_path / "bom.csv").write_text("\ufeffy,a\n0,1.5\n1,2.5\n", encoding="utf-8")  # as spreadsheets save
    assert load_data(tmp_path / "bom.csv", target="y").x.tolist() == [[1.5], [2.5]]
    (tmp_path / "u.csv").write_text("a,y\n1,0\nfoo,1\n")
    with pytest.raises(UserDataError, match="line 3: feature 'a' is 'foo'"):
        load_data(tmp_path / "u.csv", target="y")


# ---------------------------------------------------------------- ranking
def test_rank_scores_match_gradsign_on_the_same_batch_and_seed(folder, cands):
    result = rank(str(cands), folder, proxies=["gradsign", "naswot"], batch_size=9, seed=4)
    rows = {r.candidate: r for r in result.rows}
    batch = draw_batch(load_data(folder), 9, 4)
    torch.manual_seed(4)
    wide = net(16, 3)
    expected = gradsign.scores(wide, batch.inputs, batch.targets, ["gradsign", "naswot"], seed=4)
    assert rows["wide"].scores == pytest.approx(expected, rel=1e-9)
    assert rows["wide"].n_params == sum(p.numel() for p in wide.parameters())
    ok = [r for r in result.rows if r.error is None]
    assert {r.candidate for r in ok} == {"narrow", "wide", "instance"}
    for proxy in ("gradsign", "naswot"):
        values = np.array([r.scores[proxy] for r in ok])
        assert [r.ranks[proxy] for r in ok] == rankdata(-values, method="min").astype(int).tolist()
    assert [r.ranks["gradsign"] for r in ok] == [1, 2, 3]  # rows in rank order, failures last
    assert result.rows[0].candidate == "wide"
    errors = {r.candidate: r.error for r in result.rows if r.error}
    assert "ZeroDivisionError" in errors["raises"]
    assert "does not fit 3 classes" in errors["wrong-classes"]
    assert "shapes cannot be multiplied" in errors["wrong-input"]
    assert "not an nn.Module" in errors["not-a-model"]
    assert all(math.isnan(v) for v in rows["raises"].scores.values()) and rows["raises"].ranks["gradsign"] is None
    again = rank(f"{cands}:only_wide", folder, proxies=["gradsign", "naswot"], batch_size=9, seed=4)
    assert again.rows[0].scores == rows["wide"].scores  # same seed, same batch: the same weights


def test_rank_takes_dicts_arrays_losses_and_n_inits():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)).astype(np.float32), rng.normal(size=30)
    models = {"mlp": lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1)), "lin": nn.Linear(5, 1)}
    result = rank(models, (x, y), loss="mse", batch_size=10, seed=1, n_inits=2, proxies=["gradsign", "params"])
    assert [r.error for r in result.rows] == [None, None]
    batch = draw_batch(load_data_arrays(x, y), 10, 1, target_kind="values")
    expected = []
    for seed in (1, 2):  # a builder is built once per initialisation, under seeds seed, seed + 1
        torch.manual_seed(seed)
        expected.append(gradsign.score(models["mlp"](), batch.inputs, batch.targets,
                                       loss_fn=torch.nn.functional.mse_loss, seed=seed))
    rows = {r.candidate: r for r in result.rows}
    assert rows["mlp"].scores["gradsign"] == pytest.approx(sum(expected) / 2) and rows["mlp"].notes == []
    assert "reset_parameters" in rows["lin"].notes[0]  # a built model can only be re-drawn
    assert {r.candidate: r.n_params for r in result.rows} == {"mlp": 57, "lin": 6}
    assert resolve_loss("torch.nn.functional:cross_entropy").fn is torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        resolve_loss("hinge")


class BatchMixing(nn.Module):
    """Centres each input on the batch mean: samples interact, so the batched engine must not be used."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x - x.mean(0, keepdim=True))


def test_engine_fallbacks_and_warnings_become_notes_of_the_row(capsys, caplog):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(12, 4)).astype(np.float32), np.arange(12) % 2)
    result = rank({"mixing": BatchMixing, "plain": lambda: nn.Linear(4, 2)}, data, batch_size=8)
    notes = {r.candidate: r.notes for r in result.rows}
    assert notes["plain"] == [] and notes["mixing"]
    assert "note: mixing: " in result.format_table()
    assert capsys.readouterr().err == ""
    batch = draw_batch(load_data_arrays(*data), 8, 0)
    torch.manual_seed(0)
    caplog.clear()
    with caplog.at_level("WARNING", logger="gradsign"), pytest.warns(UserWarning) as warned:
        gradsign.score(BatchMixing(), batch.inputs, batch.targets)  # the same model, scored directly
    direct = [r.getMessage() for r in caplog.records] + [str(w.message) for w in warned]
    assert direct and sorted(notes["mixing"]) == sorted(m.splitlines()[0] for m in direct)


def load_data_arrays(x, y):
    from gradsign.userdata import UserData
    return UserData("arrays", "arrays", y, x=x)


def test_workers_give_the_serial_scores_and_an_ensemble_ranks_within_the_candidates(folder, cands):
    pytest.importorskip("gradsign.ensemble")
    common = dict(candidates=f"{cands}:only_wide", data=folder, batch_size=4, seed=5)
    serial = rank(**common, proxies=["gradsign"])
    pooled = rank(**common, proxies=["gradsign"], workers=2)
    assert pooled.rows[0].scores == serial.rows[0].scores
    result = rank(str(cands), folder, batch_size=6, seed=0, proxies=["ensemble:rank_sum:gradsign+naswot"])
    ok = [r for r in result.rows if r.error is None]
    expected = sum(rankdata([r.scores[p] for r in ok], method="average") for p in ("gradsign", "naswot"))
    assert [r.scores["ensemble:rank_sum:gradsign+naswot"] for r in ok] == expected.tolist()
    assert result.rows[0].ranks["ensemble:rank_sum:gradsign+naswot"] == 1


def test_transformers_config_spec_builds_the_library_model(folder):
    transformers = pytest.importorskip("transformers")
    spec = ("tiny-resnet=transformers:ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], "
            "layer_type='basic')")
    result = rank(spec, folder, batch_size=6, seed=2, proxies=["gradsign"])
    row = result.rows[0]
    assert row.candidate == "tiny-resnet" and row.error is None
    batch = draw_batch(load_data(folder), 6, 2)
    torch.manual_seed(2)
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic", num_labels=3))
    assert row.scores["gradsign"] == gradsign.score(model, batch.inputs, batch.targets, seed=2)
    assert row.n_params == sum(p.numel() for p in model.parameters())


def test_cli_writes_table_csv_plot_json_and_refuses_to_overwrite(capsys, folder, cands, tmp_path):
    common = ["rank", "--candidates", f"{cands}:only_wide", "--candidates", cands, "--data", folder,
              "--batch-size", 6, "--out", tmp_path / "out", "--json", tmp_path / "r.json"]
    status, out, err = run(capsys, *common)
    assert status == 2 and "two candidates are named 'wide'" in err
    common[2] = "small=torch.nn:Linear(5, 3)"  # a call: one candidate (and one that does not fit the images)
    status, out, err = run(capsys, *common)
    assert status == 0, err
    assert "| 1 | wide |" in out and "ranked by gradsign (higher is better)" in out
    report = json.loads((tmp_path / "r.json").read_text())
    by_name = {c["candidate"]: c for c in report["candidates"]}
    assert by_name["wide"]["rank"] == 1 and by_name["raises"]["scores"]["gradsign"] is None
    assert "shapes cannot be multiplied" in by_name["small"]["error"]
    csv_lines = (tmp_path / "out" / "rank.csv").read_text().splitlines()
    assert csv_lines[0].startswith("rank,candidate,gradsign,gradsign_rank,n_params") and len(csv_lines) == 9
    assert (tmp_path / "out" / "rank.png").stat().st_size > 0
    before = (tmp_path / "r.json").read_text()
    status, out, err = run(capsys, *common)
    assert status == 2 and "--force" in err and (tmp_path / "r.json").read_text() == before


def test_cli_ranks_on_csv_and_npz_data(capsys, tmp_path):
    rng = np.random.default_rng(2)
    rows = ["f1,f2,price"] + [f"{a:.3f},{b:.3f},{a - 2 * b:.3f}" for a, b in rng.normal(size=(20, 2))]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    status, out, err = run(capsys, "rank", "--data", tmp_path / "t.csv", "--target", "price", "--loss", "mse",
                           "--candidates", "lin=torch.nn:Linear(2, 1)",
                           "--candidates", "wide=torch.nn:Linear(2, 3)",
                           "--batch-size", 8, "--proxies", "gradsign,grad_norm", "--json", tmp_path / "csv.json")
    assert status == 0, err
    report = {c["candidate"]: c for c in json.loads((tmp_path / "csv.json").read_text())["candidates"]}
    assert report["lin"]["rank"] == 1 and report["lin"]["n_params"] == 3
    assert "does not fit 1 targets" in report["wide"]["error"]
    assert "drawn uniformly" in out and "loss mse" in out
    np.savez(tmp_path / "b.npz", x=rng.normal(size=(16, 4)), y=np.arange(16) % 2)
    status, out, err = run(capsys, "rank", "--data", tmp_path / "b.npz", "--loss", "bce", "--batch-size", 8,
                           "--candidates", "lin=torch.nn:Linear(4, 1)")
    assert status == 0, err
    assert "| 1 | lin |" in out and "classes balanced (4-4 per class)" in out


def bad_inputs(tmp_path, folder, cands):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "cat").mkdir()
    (tmp_path / "empty" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "cat" / "0.png")
    shutil.copytree(folder, tmp_path / "corrupt")
    (tmp_path / "corrupt" / "dog" / "9.png").write_bytes(b"this is not a png")
    (tmp_path / "raising.py").write_text("import nothing_here_at_all\n")
    (tmp_path / "lacking.py").write_text("models = {}\n")
    (tmp_path / "t.csv").write_text("a,b\n1,2\n3,4\n")
    ok = ["--candidates", cands, "--data", folder]
    return {
        "missing folder": (["--candidates", cands, "--data", tmp_path / "nowhere"], "no data at"),
        "empty class folder": (["--candidates", cands, "--data", tmp_path / "empty"], "holds no images"),
        "unreadable image": (["--candidates", cands, "--data", tmp_path / "corrupt", "--batch-size", 13],
                             "not an image Pillow can read"),
        "candidate file raises": (["--candidates", tmp_path / "raising.py", "--data", folder],
                                  "raised ModuleNotFoundError"),
        "no candidates function": (["--candidates", tmp_path / "lacking.py", "--data", folder],
                                   "defines no candidates"),
        "missing candidates file": (["--candidates", tmp_path / "nope.py", "--data", folder],
                                    "no candidates file"),
        "unknown loss": (ok + ["--loss", "hinge"], "unknown loss"),
        "unknown target column": (["--candidates", cands, "--data", tmp_path / "t.csv", "--target", "y"],
                                  "no column 'y'"),
        "unknown proxy": (ok + ["--proxies", "magic"], "unknown proxy"),
        "batch too large": (ok + ["--batch-size", 100], "exceeds the 12 samples"),
        "bad normalisation": (ok + ["--normalize", "zscore"], "unknown normalisation"),
        "unknown data format": (["--candidates", cands, "--data", cands], "unknown data format"),
        "bad image size": (ok + ["--image-size", "0"], "image size"),
    }


def test_bad_input_is_one_line_with_status_2(capsys, tmp_path, folder, cands):
    for name, (argv, expected) in bad_inputs(tmp_path, folder, cands).items():
        status, out, err = run(capsys, "rank", "--batch-size", 6, *argv)  # a later --batch-size wins
        assert status == 2, (name, err)
        assert expected in err and len(err.strip().splitlines()) == 1, (name, err)
        assert "Traceback" not in err


def test_parse_image_size():
    assert parse_image_size("32") == (32, 32) and parse_image_size("32x24") == (32, 24)
    assert parse_image_size(None) is None
    with pytest.raises(ValueError):
        parse_image_size("a,b")
