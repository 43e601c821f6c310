"""Evaluation numbers against hand-computed values: top-1, top-k, per-class accuracy, confusion, loss, flip TTA."""

import math

import pytest
import torch

from vggnet.data import ImageDataset, Preprocess
from vggnet.evaluation.metrics import evaluate, metrics_from_logits

# Six samples, three classes. Predictions (argmax): 0, 1, 2, 2, 0, 1.
LOGITS = [[2.0, 1.0, 0.0],
          [0.0, 3.0, 1.0],
          [1.0, 0.0, 2.0],
          [0.0, 1.0, 5.0],
          [4.0, 0.0, 1.0],
          [1.0, 2.0, 0.0]]
LABELS = [0, 1, 1, 2, 2, 2]
# confusion[true][predicted], counted by hand from the two lists above.
CONFUSION = [[1, 0, 0],
             [0, 1, 1],
             [1, 1, 1]]


def hand_loss(logits, labels):
    """Mean over samples of log(sum_j exp(z_j)) - z_label."""
    return sum(math.log(sum(math.exp(z) for z in row)) - row[y] for row, y in zip(logits, labels)) / len(labels)


def test_metrics_from_logits_by_hand():
    result = metrics_from_logits(torch.tensor(LOGITS), torch.tensor(LABELS), 3)
    assert result.n == 6
    assert result.top1 == 3 / 6
    assert result.top5 == 1.0  # k = min(5, 3) = 3 classes: every label is in the "top 5"
    assert result.confusion == CONFUSION
    assert result.per_class == [1.0, 0.5, 1 / 3]
    assert result.loss == pytest.approx(hand_loss(LOGITS, LABELS), abs=1e-6)
    assert result.classes == ["0", "1", "2"]


def test_top5_with_more_than_five_classes():
    row = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]  # class c has rank c + 1
    logits = torch.tensor([row, row, row, row])
    labels = torch.tensor([4, 5, 0, 6])  # rank 5 (in the top 5), rank 6 and 7 (out), rank 1
    result = metrics_from_logits(logits, labels, 7, classes=list("abcdefg"))
    assert result.top1 == 1 / 4
    assert result.top5 == 2 / 4
    assert result.per_class[0] == 1.0 and result.per_class[4] == 0.0 and result.per_class[5] == 0.0
    assert [math.isnan(v) for v in result.per_class] == [False, True, True, True, False, False, False]  # no support
    assert result.confusion[4][0] == 1 and sum(map(sum, result.confusion)) == 4
    assert result.to_dict()["per_class_named"]["a"] == 1.0


def test_top_k_is_top_num_classes_below_five():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [3.0, 2.0]])
    result = metrics_from_logits(logits, torch.tensor([0, 0, 1]), 2)
    assert (result.top1, result.top5) == (1 / 3, 1.0)


def test_a_given_loss_is_kept():
    assert metrics_from_logits(torch.tensor(LOGITS), torch.tensor(LABELS), 3, loss=0.25).loss == 0.25


class Lookup(torch.nn.Module):
    """Returns ``table[i]`` for an image whose top-left pixel is ``i`` (with the identity preprocessing below)."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", torch.tensor(table, dtype=torch.float32))

    def forward(self, x):
        index = (x[:, 0, 0, 0] * 255).round().long()
        return self.table[index]


def encoded_images(n):
    """Image i: top-left pixel i, top-right pixel 100 + i, so its mirror image reads 100 + i."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n)
    images[:, 0, 0, 3] = 100 + torch.arange(n)
    return images


IDENTITY = Preprocess(4, (0.0,), (1.0,), fit="auto", in_size=4)  # x / 255 only


def test_evaluate_with_a_model_whose_logits_are_known():
    table = [[0.0, 0.0, 0.0]] * 256
    table[:6] = LOGITS
    dataset = ImageDataset(encoded_images(6), torch.tensor(LABELS), ["a", "b", "c"], "hand")
    result = evaluate(Lookup(table), dataset, IDENTITY, batch_size=4)  # two batches: 4 + 2
    assert result.n == 6 and result.top1 == 0.5 and result.top5 == 1.0
    assert result.confusion == CONFUSION and result.per_class == [1.0, 0.5, 1 / 3]
    assert result.loss == pytest.approx(hand_loss(LOGITS, LABELS), abs=1e-6)
    assert result.classes == ["a", "b", "c"]


def test_flip_tta_averages_the_probabilities_of_the_image_and_its_mirror():
    p = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]]  # the images
    q = [[0.1, 0.8, 0.1], [0.1, 0.6, 0.3], [0.9, 0.05, 0.05], [0.1, 0.15, 0.75]]  # their mirrors
    average = [[0.4, 0.5, 0.1], [0.1, 0.6, 0.3], [0.6, 0.175, 0.225], [0.3, 0.2, 0.5]]  # (p + q) / 2 by hand
    labels = [1, 1, 0, 0]
    table = [[1.0, 1.0, 1.0]] * 256
    table[0:4] = [[math.log(v) for v in row] for row in p]
    table[100:104] = [[math.log(v) for v in row] for row in q]
    dataset = ImageDataset(encoded_images(4), torch.tensor(labels), ["a", "b", "c"], "hand")

    plain = evaluate(Lookup(table), dataset, IDENTITY)
    assert plain.top1 == 2 / 4  # argmax of p: 0, 1, 2, 0
    assert plain.loss == pytest.approx(-(math.log(0.2) + math.log(0.6) + math.log(0.3) + math.log(0.5)) / 4)

    tta = evaluate(Lookup(table), dataset, IDENTITY, tta="flip")
    assert tta.top1 == 3 / 4  # argmax of the average: 1, 1, 0, 2
    assert tta.confusion == [[1, 0, 1], [0, 2, 0], [0, 0, 0]]
    assert tta.per_class[:2] == [0.5, 1.0] and math.isnan(tta.per_class[2])
    expected = -sum(math.log(average[i][y]) for i, y in enumerate(labels)) / 4
    assert tta.loss == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("size, batch", [(4, 256), (28, 256), (32, 256), (64, 196), (224, 16), (2000, 1)])
def test_default_batch_follows_the_image_size(size, batch):
    from vggnet.evaluation.metrics import EVAL_PIXELS, MAX_EVAL_BATCH, auto_batch_size

    assert auto_batch_size(size, size) == batch
    assert batch == max(1, min(MAX_EVAL_BATCH, EVAL_PIXELS // (size * size)))  # 16 * 224 * 224 pixels, at most 256


def _small_bn_vgg():
    from vggnet.net.models import create_model

    torch.manual_seed(0)
    model = create_model("vgg11_bn", num_classes=10, in_channels=1, width=0.25, head="gap", input_size=32)
    for m in model.modules():  # running statistics far from the (0, 1) defaults, so folding them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.cpu_bf16
def test_bf16_evaluation_runs_the_fast_path_without_touching_the_model(monkeypatch):
    import vggnet.evaluation.metrics
    from vggnet.evaluation.metrics import predict_logits
    from vggnet.evaluation.inference import BF16_RTOL

    built = []
    real = vggnet.evaluation.metrics.optimize_for_inference
    monkeypatch.setattr(vggnet.evaluation.metrics, "optimize_for_inference",
                        lambda *a, **k: built.append(a[1:]) or real(*a, **k))

    model = _small_bn_vgg()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (40, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    prep = Preprocess(32, (0.3,), (0.3,), fit="auto", in_size=32)
    fp32 = predict_logits(model, images, prep, torch.device("cpu"), "fp32", batch_size=7)
    fp32_one_batch = predict_logits(model, images, prep, torch.device("cpu"), "fp32")
    assert built == []  # fp32: the model itself
    bf16 = predict_logits(model, images, prep, torch.device("cpu"), "bf16")
    assert built == [("bf16", True)]  # one folded bf16 channels_last copy for the whole pass
    assert torch.allclose(fp32, fp32_one_batch, atol=1e-5)  # the batch size does not change the numbers
    assert bf16.dtype == torch.float32 and bf16.shape == (40, 10)
    error = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert 0 < error < BF16_RTOL  # bf16 rounding, not an exact copy and not a different model
    # The model evaluated is a folded copy: the caller's model keeps its BNs, weights and dtype.
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 8
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
