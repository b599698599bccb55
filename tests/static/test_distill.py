"""Recovery by knowledge distillation (finetune/train.py distill_loss, static/recover.py distill=): the
loss equals T^2 KL(teacher_T || student_T) computed by hand, is zero for the teacher itself, and a
distillation-only recovery moves the student's logits toward the teacher's."""

from __future__ import annotations

import copy

import pytest
import torch
from ft_fixtures import fine_tuned

from dynaprune.errors import DynapruneError
from dynaprune.finetune import FinetuneConfig, finetune
from dynaprune.finetune.train import distill_loss


@pytest.fixture(scope="module")
def pair(tiny_bert_folder, tmp_path_factory):
    teacher, train, labels, _ = fine_tuned(tiny_bert_folder, tmp_path_factory.mktemp("kd"), 64)
    return teacher, train, labels


def _batch(model, texts):
    ids = [torch.tensor(x) for x in model.tokenize(texts)]
    x = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)
    return x, torch.arange(x.shape[1]) < torch.tensor([len(i) for i in ids])[:, None]


def test_distill_loss_is_the_tempered_kl(pair):
    teacher, train, _ = pair
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.head.classifier.bias.add_(torch.tensor([0.7, -0.4]))
    x, mask = _batch(teacher, train.texts[:8])
    with torch.no_grad():
        s = student.head(*student(x, mask, torch.zeros_like(x)))
        t = teacher.head(*teacher(x, mask, torch.zeros_like(x)))
        T = 3.0
        pt, ps = (t / T).softmax(1), (s / T).softmax(1)
        by_hand = T * T * (pt * (pt.log() - ps.log())).sum(1).mean()
        assert float(distill_loss(s, teacher, x, mask, T)) == pytest.approx(float(by_hand), rel=1e-5)
        assert float(distill_loss(t, teacher, x, mask, T)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_only_recovery_moves_toward_the_teacher(pair):
    teacher, train, labels = pair
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.head.classifier.bias.add_(torch.tensor([2.0, -2.0]))
    x, mask = _batch(teacher, train.texts)

    def gap(m):
        with torch.no_grad():
            return float(distill_loss(m.head(*m(x, mask, torch.zeros_like(x))), teacher, x, mask, 1.0))

    before = gap(student)
    cfg = FinetuneConfig(epochs=8, batch_size=16, lr=1e-2, distill=1.0, temperature=1.0)
    finetune(student, train, labels, None, cfg, teacher=teacher)
    assert gap(student) < 0.5 * before
    with pytest.raises(DynapruneError, match="teacher"):
        finetune(student, train, labels, None, cfg)
    with pytest.raises(DynapruneError, match="distillation weight"):
        finetune(student, train, labels, None, FinetuneConfig(distill=1.5), teacher=teacher)
