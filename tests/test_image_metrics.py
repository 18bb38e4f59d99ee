"""FID / KID / IS in closed form, the feature networks by name, and their weight files."""

import numpy as np
import pytest
import torch

from app.config import ConfigError, parse_config
from app.metrics import (INCEPTION_FILE, ClassifierFeatures, EvaluatorMissing, ImageEvaluator, classifier_path,
                         describe_scores, embed, fid_from_features, inception_score_from_logits,
                         inception_weights_path, kid_from_features, label_histogram, load_classifier,
                         load_feature_net, save_classifier)
from models.classifier import Classifier, augment, build_classifier
from strategies.client_eval import tv_distance


# --- FID / KID / IS on feature sets ------------------------------------------------------------
def gaussian(n, d, seed, shift=None):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x if shift is None else x + shift


def test_fid_of_a_feature_set_with_itself_is_zero():
    x = gaussian(2000, 16, 0)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_equal_covariance_gaussians_is_the_squared_mean_distance():
    # same samples shifted: identical covariance, so the trace term vanishes exactly
    x = gaussian(3000, 8, 1)
    shift = torch.tensor([1.0, -2.0, 0.5, 0, 0, 0, 0, 3.0], dtype=torch.float64)
    assert fid_from_features(x, x + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)


def test_fid_of_two_diagonal_gaussians_matches_the_closed_form():
    # N(0, I) vs N(0, 4 I) in d dims: Tr(I + 4I - 2*2I) = d
    x = gaussian(20000, 4, 2)
    y = 2.0 * gaussian(20000, 4, 3)
    assert fid_from_features(x, y) == pytest.approx(4.0, rel=0.05)


def test_kid_of_identical_sets_is_about_zero_and_grows_with_a_shift():
    x = gaussian(1000, 8, 4)
    same, _ = kid_from_features(x, x, subset_size=500)
    shifted, _ = kid_from_features(x, x + 1.0, subset_size=500)
    assert abs(same) < 0.01 * shifted
    assert shifted > 0.1


def test_kid_is_reproducible_for_a_seed():
    x, y = gaussian(600, 8, 5), gaussian(600, 8, 6, 0.3)
    assert kid_from_features(x, y, subset_size=200, seed=3) == kid_from_features(x, y, subset_size=200, seed=3)


def test_inception_score_of_one_hot_uniform_predictions_is_the_class_count():
    logits = 100.0 * torch.eye(10).repeat(50, 1)
    mean, std = inception_score_from_logits(logits, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == 0.0


def test_inception_score_of_a_collapsed_generator_is_one():
    logits = torch.zeros(500, 10)
    logits[:, 3] = 100.0
    assert inception_score_from_logits(logits, splits=1)[0] == pytest.approx(1.0, rel=1e-6)


def test_label_histogram_and_total_variation():
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    assert label_histogram(logits, 3) == [1, 2, 1]
    assert tv_distance([1, 2, 1], [1, 2, 1]) == 0.0
    assert tv_distance([1, 0], [0, 1]) == 1.0
    assert tv_distance([1, 2, 1], [2, 0, 2]) == pytest.approx(0.5)   # |.25-.5|+|.5-0|+|.25-.5| = 1 -> 0.5
    with pytest.raises(ValueError):
        tv_distance([1, 2], [1, 2, 3])


# --- the classifier extractor ------------------------------------------------------------------
def tiny_classifier(channels=1, side=16, width=4, seed=0):
    torch.manual_seed(seed)
    return Classifier(channels, side, 10, width=width)


def test_classifier_features_and_logits_have_the_documented_shapes_for_any_input_geometry():
    net = ClassifierFeatures(tiny_classifier())
    for shape in [(3, 1, 16, 16), (3, 1, 32, 32), (3, 3, 16, 16)]:
        f, logits = net(torch.rand(shape) * 2 - 1)
        assert f.shape == (3, net.num_features) and logits.shape == (3, 10)


def test_classifier_round_trips_through_the_cache_and_a_missing_one_names_the_command(tmp_path):
    with pytest.raises(EvaluatorMissing, match=r"train_evaluator.py --dataset digits --image-size 16 --channels 1"):
        load_classifier("digits", 16, 1, str(tmp_path))
    net = tiny_classifier()
    path = save_classifier(classifier_path("digits", 16, 1, str(tmp_path)), net, {"test_accuracy": 0.5})
    assert path == tmp_path / "classifier-digits-16px-1ch.pt"
    loaded, meta = load_classifier("digits", 16, 1, str(tmp_path))
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    net.eval()
    assert torch.equal(loaded(x), net(x)) and meta == {"test_accuracy": 0.5}
    assert build_classifier(net.config()).num_features == net.num_features


def test_image_evaluator_scores_real_images_against_themselves_as_zero_and_counts_labels(tmp_path):
    net = ClassifierFeatures(tiny_classifier())
    ev = ImageEvaluator(net, tv_name="tv_own")
    x = torch.rand(64, 1, 16, 16) * 2 - 1
    y = torch.randint(0, 10, (64,))
    ev.set_real(x, y, 10)
    scores = ev.score(x)
    assert scores["fid"] == pytest.approx(0.0, abs=1e-6)
    assert scores["extractor"] == "classifier" and scores["num_samples"] == 64 and scores["num_real"] == 64
    _, logits = embed(net, x)
    assert scores["label_histogram"] == label_histogram(logits, 10) and sum(scores["label_histogram"]) == 64
    assert scores["tv_own"] == pytest.approx(tv_distance(scores["label_histogram"], np.bincount(y, minlength=10)))
    assert "classifier features, 64 samples" in describe_scores(scores)


def test_augment_only_flips_and_shifts():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    same = augment(x, torch.Generator().manual_seed(0), flip=False, shift=0)
    assert torch.equal(same, x)
    moved = augment(x, torch.Generator().manual_seed(0), flip=True, shift=1)
    assert moved.shape == x.shape


# --- the inception extractor: weights by path or in torch hub's cache -----------------------------
def write_standin_inception_weights(path):
    """A stand-in for the real weights file: the same keys and shapes, random values."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random initialization
            return None

    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.parent / "empty.pth"
    torch.save({}, empty)
    net = RandomInit("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    empty.unlink()
    torch.save(net.state_dict(), path)
    return path


def test_inception_weights_are_found_where_the_error_message_says(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE
    assert inception_weights_path() == expected
    with pytest.raises(EvaluatorMissing) as missing:
        load_feature_net("inception")
    assert str(expected) in str(missing.value) and "inception-weights" in str(missing.value)
    write_standin_inception_weights(expected)
    net = load_feature_net("inception")
    f, logits = net(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert net.name == "inception" and f.shape == (2, 2048) and logits.shape == (2, 1008)
    # the loaded weights are the file's, not a fresh initialization
    saved = torch.load(expected)
    assert torch.equal(net.net.state_dict()["Conv2d_1a_3x3.conv.weight"], saved["Conv2d_1a_3x3.conv.weight"])


def test_inception_weights_at_a_configured_path(tmp_path):
    path = write_standin_inception_weights(tmp_path / "w" / "my-inception.pth")
    missing = tmp_path / "no-such.pth"
    with pytest.raises(EvaluatorMissing, match="no-such.pth") as err:
        load_feature_net("inception", inception_weights=str(missing))
    assert "\n" not in str(err.value) and str(missing) in str(err.value)   # one line naming the path
    assert load_feature_net("inception", inception_weights=str(path)).num_features == 2048


def test_inception_features_come_from_torch_fidelitys_public_extractor(tmp_path):
    import torch_fidelity

    path = write_standin_inception_weights(tmp_path / "w" / "inception.pth")
    net = load_feature_net("inception", inception_weights=str(path))
    assert type(net.net) is torch_fidelity.FeatureExtractorInceptionV3   # not torchmetrics' private subclass
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    f, logits = net(x)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    want_f, want_logits = net.net(u8)      # the public forward, features in the order asked for
    assert torch.equal(f, want_f) and torch.equal(logits, want_logits)
    assert f.shape == (3, 2048) and logits.shape == (3, 1008)


def test_an_unknown_extractor_is_a_config_error():
    with pytest.raises(ConfigError, match="eval-extractor"):
        parse_config({"eval-extractor": "vgg"})


def test_image_scores_requested_without_a_classifier_stop_the_run_at_start(tmp_path):
    from app.server_app import sample_evaluator

    cfg = parse_config({"eval-every": 1, "evaluator-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"eval-every.*train_evaluator.py --dataset digits"):
        sample_evaluator(cfg)
    assert sample_evaluator(parse_config({"eval-every": 0})) is None   # images are scored only when asked
