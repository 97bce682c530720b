"""Read a dashboard written by ``saestrata inspect`` from Python, without the HTML browser.

    saestrata inspect --sae demo-out/runs/layer8/topk --store demo-out/store-train --out inspect-out
    python docs/examples/inspect_latents.py inspect-out --latent 12 --store demo-out/store-train

Prints the latent's statistics, its logit effects and its top examples (the example token in
[brackets], each line ``token <global index>  <activation>  <text>``), then opens the store as
torch batches of whole context rows and prints one JSON line about the first batch.
"""

from __future__ import annotations

import argparse
import json

from saestrata.dashboards import load_dashboard, open_store, ordered_batches


def show_example(example: dict) -> str:
    """One example as text: the window's tokens, the example token in brackets (outside-window slots dropped)."""
    parts = []
    for j, text in enumerate(example["tokens"]):
        if text is None:
            continue
        parts.append(f"[{text}]" if j == example["centre"] else text)
    return "".join(parts).replace("\n", "\\n")


def main() -> None:
    """Parse arguments, print one latent, then one batch of the store."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dashboard", help="folder written by saestrata inspect --out")
    ap.add_argument("--latent", type=int, default=None, help="latent to show (default: the densest)")
    ap.add_argument("--store", help="also open this store as torch batches")
    args = ap.parse_args()

    dash = load_dashboard(args.dashboard)
    i = args.latent
    if i is None:
        i = max(dash.index["latents"], key=lambda r: r["density"] or 0)["latent"]
    lat = dash.latent(i)
    print(f"latent {i}: {json.dumps(lat['stats'])} structure {json.dumps(lat['structure'])}")
    if lat["logits"]:
        print("promotes:", ", ".join(repr(s) for s, _ in lat["logits"]["top"][:5]))
        print("suppresses:", ", ".join(repr(s) for s, _ in lat["logits"]["bottom"][:5]))
    for ex in lat["top"]:
        print(f"token {ex['index']}  {ex['value']:.3f}  {show_example(ex)}")

    if args.store:
        store = open_store(args.store, allow_partial=True)
        batch = next(iter(ordered_batches(store, store.hooks[0], rows_per_batch=4)))
        print(json.dumps({"rows": len(batch.token_ids) // int(store.attrs["context_length"]),
                          "acts": list(batch.acts.shape), "dtype": str(batch.acts.dtype), "start": batch.start}))


if __name__ == "__main__":
    main()
