"""token_losses against HF's per-token cross-entropy, entropy and hits from full logits; bad inputs refused."""

import pytest
import torch
import torch.nn.functional as F
from support.archs import VOCAB, tiny_model
from support.hf_reference import BACKENDS, hf_token_ce

import slm
from slm.model import shifted_valid


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi", "gemma2"])
def test_token_losses_equal_hf_per_token_ce(arch, batch):
    ids, am, labels = batch
    model = tiny_model(arch)
    tl = slm.token_losses(model, ids, labels, attention_mask=am, chunk_elements=3 * VOCAB)  # many chunks
    with torch.no_grad():
        torch.testing.assert_close(tl, hf_token_ce(model, ids, labels, am), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "gemma2", "cohere"])
def test_token_entropy_and_hits_equal_those_of_hf_logits(arch, batch, backend):
    ids, am, labels = batch
    model = tiny_model(arch)
    loss, hits, ent = slm.token_losses(model, ids, labels, attention_mask=am, return_hits=True, return_entropy=True,
                                       chunk_elements=3 * VOCAB, head_backend=backend)  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].float()
    expected = F.pad(torch.distributions.Categorical(logits=logits).entropy(), (1, 0)) * shifted_valid(labels)
    torch.testing.assert_close(ent, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(hits, F.pad(logits.argmax(-1) == labels[:, 1:], (1, 0)) & shifted_valid(labels))
    torch.testing.assert_close(loss, hf_token_ce(model, ids, labels, am).detach(), atol=1e-5, rtol=1e-5)


def test_token_losses_refuses_out_of_vocabulary_labels_and_1d_inputs():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 6))
    with pytest.raises(ValueError, match=r"token ids in \[0, 101\)"):
        slm.token_losses(model, ids, ids + VOCAB)
    with pytest.raises(ValueError, match=r"must be \[batch, seq\]"):
        slm.token_losses(model, ids[0], ids[0])
