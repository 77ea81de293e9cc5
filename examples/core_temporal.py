"""Measured figures for temporal sparsity and core neurons on the embedded MiniLM."""
import numpy as np
import actscope
from actscope.metrics import core_neurons
from actscope.metrics import temporal_sparsity

model = actscope.load()
ts = temporal_sparsity(model, None, sites="blocks.*.mlp.post", max_tokens=2000)
t = ts.to_pandas()
print("temporal vs activation sparsity, builtin corpus, 2000 tokens")
print(t[t.eps.isin([0.01, 0.1])][["site", "pairs", "eps", "temporal_sparsity", "activation_sparsity", "mean_abs_delta"]].to_string(index=False))

PAIRS = [
    ("The doctor examined the patient carefully.", "The physician checked the sick man thoroughly."),
    ("A cat was sleeping on the sofa.", "A kitten dozed on the couch."),
    ("Stock prices dropped sharply today.", "Shares fell steeply this afternoon."),
    ("He drove his car to work.", "He commuted to the office by automobile."),
    ("It is raining heavily outside.", "There is a downpour out there."),
]
texts = [x for p in PAIRS for x in p]
for beta in (0.2, 0.4):
    r = core_neurons(model, texts, site="blocks.*.mlp.post", alpha=0.4, beta=beta, prefixes=(1, 2, 4, 8))
    print(f"\ncore-set overlap |A∩B|/|B|, alpha=0.4 beta={beta}")
    for s in r.sites:
        m = r.similarity_matrix(s)
        para = [m[2 * i, 2 * i + 1] for i in range(len(PAIRS))]
        un = [m[i, j] for i in range(len(texts)) for j in range(len(texts)) if i // 2 != j // 2]
        print(f"{s}: paraphrase min {min(para):.3f} mean {np.mean(para):.3f} | unrelated max {max(un):.3f} mean {np.mean(un):.3f}")
    st = r.stability().to_pandas()
    st = st[st.prefix_tokens < st.tokens]
    print("stability: mean overlap with the full core set by prefix length (all texts, all layers)")
    print(st.groupby("prefix_tokens").overlap.mean().round(3).to_string())
