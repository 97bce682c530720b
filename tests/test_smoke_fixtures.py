"""The fixtures themselves: the tiny model loads and harvests through the real code path."""

from saestrata.store import ActivationStore

from conftest import TINY_D_MODEL, TINY_LAYERS


def test_tiny_store_shapes(tiny_lm, tiny_store):
    assert tiny_lm.n_layers == TINY_LAYERS and tiny_lm.d_model == TINY_D_MODEL
    store = ActivationStore(tiny_store)
    assert store.n_tokens == 4096
    assert store.activations("blocks.2.hook_resid_post").shape == (4096, TINY_D_MODEL)
    assert store.attrs["complete"] is True
