import torch

from reaemb_trl.evaluation.models import BERT4Rec, GRU4Rec, SASRec, bert_cloze
from reaemb_trl.evaluation.tables import AdapterTable, IDTable

N, H = 20, 16


def _sasrec():
    torch.manual_seed(0)
    return SASRec(IDTable(N, H), hidden=H, max_len=12, layers=2, heads=2, dropout=0.0).eval()


def test_sasrec_is_causal():
    model = _sasrec()
    a = torch.tensor([[3, 5, 7, 9, 11, 2]])
    b = torch.tensor([[3, 5, 7, 1, 4, 6]])  # same prefix, different future
    out_a, out_b = model(a), model(b)
    assert torch.allclose(out_a[:, :3], out_b[:, :3], atol=1e-6)
    assert not torch.allclose(out_a[:, 3], out_b[:, 3])
    # the last item gets a real (non-zero) vector that depends on it
    c = torch.tensor([[3, 5, 7, 9, 11, 8]])
    assert out_a[0, -1].abs().sum() > 0 and not torch.allclose(out_a[0, -1], model(c)[0, -1])


def test_sasrec_padding_invariant_and_batch_independent():
    model = _sasrec()
    alone = model(torch.tensor([[4, 8, 15]]))
    padded = model(torch.tensor([[4, 8, 15, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7]]))
    assert torch.allclose(alone[0], padded[0, :3], atol=1e-6)
    assert torch.all(padded[0, 3:] == 0)  # pad positions are zeroed, not garbage
    assert torch.isfinite(padded).all()


def test_gru4rec_ignores_padding():
    torch.manual_seed(0)
    model = GRU4Rec(IDTable(N, H), hidden=H, max_len=12, dropout=0.0).eval()
    alone = model(torch.tensor([[4, 8, 15]]))
    padded = model(torch.tensor([[4, 8, 15, 0, 0], [1, 2, 3, 4, 5]]))
    assert torch.allclose(alone[0], padded[0, :3], atol=1e-6)
    assert torch.all(padded[0, 3:] == 0)


def test_bert4rec_bidirectional_with_key_padding():
    torch.manual_seed(0)
    model = BERT4Rec(IDTable(N, H), num_items=N, hidden=H, max_len=12, dropout=0.0).eval()
    m = model.mask_index
    a, b = torch.tensor([[3, m, 7]]), torch.tensor([[3, m, 9]])
    assert not torch.allclose(model(a)[0, 1], model(b)[0, 1])  # sees the future: bidirectional
    padded = model(torch.tensor([[3, m, 7, 0, 0]]))
    assert torch.allclose(model(a)[0], padded[0, :3], atol=1e-6)  # padding is masked out as keys
    # the mask token carries no information about the item it hides
    assert torch.equal(model.embed(torch.tensor([[m]])), model.embed(torch.tensor([[m]])))
    assert not torch.allclose(model.embed(torch.tensor([[m]])), model.embed(torch.tensor([[3]])))


def test_bert_cloze_masks_correctly():
    seq = torch.tensor([[1, 2, 3, 4, 5, 0, 0], [6, 7, 0, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0]])
    gen = torch.Generator().manual_seed(0)
    inputs, labels = bert_cloze(seq, mask_index=N + 1, mask_prob=0.4, generator=gen)
    masked = inputs == N + 1
    assert torch.equal(masked, labels != -100)
    assert torch.equal(labels[masked], seq[masked])  # labels hold the hidden originals
    assert torch.equal(inputs[~masked], seq[~masked])  # everything else untouched
    assert not masked[seq == 0].any()  # padding never masked
    assert masked.sum(1).min() >= 1  # every row contributes
    # with probability 0 exactly the last real item of each row is masked
    inputs, labels = bert_cloze(seq, N + 1, 0.0, gen)
    assert (inputs == N + 1).nonzero().tolist() == [[0, 4], [1, 1], [2, 0]]


def test_adapter_table_padding_zero_and_frozen():
    frozen = torch.randn(N, 32)
    table = AdapterTable(frozen, hidden=H)
    assert table.all_items().shape == (N + 1, H)
    assert torch.all(table(torch.tensor([[0, 1]]))[0, 0] == 0)
    assert torch.allclose(table(torch.tensor([3]))[0], table.all_items()[3], atol=1e-6)
    assert all(p is not table.frozen for p in table.parameters())
