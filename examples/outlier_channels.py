"""Outlier channels (max/median |a| and kurtosis) of the embedded MiniLM residual stream."""
import actscope
from actscope.data import builtin_corpus
from actscope.metrics import outlier_channels
model = actscope.load()  # the embedded all-MiniLM-L6-v2
texts = list(builtin_corpus().documents)[:64]
result = outlier_channels(model, texts, sites="blocks.*.resid.post", threshold=20)
s = result.summary().to_table()
for i in range(len(s["site"])):
    print(f"{s['site'][i]:<20} tokens {s['tokens'][i]}  channels>20x {s['outlier_channels'][i]}  max ratio {s['max_ratio'][i]:6.1f} "
          f"(channel {s['max_ratio_channel'][i]})  max kurtosis {s['max_kurtosis'][i]:5.1f} (channel {s['max_kurtosis_channel'][i]})  "
          f"median kurtosis {s['median_kurtosis'][i]:.2f}")
print(f"median |a| within ±{100 * result.median_relative_error:.2f} %")
