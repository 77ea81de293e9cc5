"""MCUNetV2: the first blocks of a MobileNetV2 use an order of magnitude more activation memory than the rest."""
import numpy as np
import torch

from actscope.zoo.cnn import mobilenet_v2
from actscope.metrics import activation_memory
result = activation_memory(mobilenet_v2(), torch.zeros(1, 3, 224, 224), torch.int8)
t = result.to_table()
blocks = [i for i, n in enumerate(t["name"]) if n.startswith("0.") and n.count(".") == 1]
for i in blocks:
    print(f"block {t['name'][i][2:]:>2} {t['kind'][i]:<17} out {t['shape'][i]:<18} peak {t['peak_bytes'][i] / 1024:8.1f} KiB")
peaks = t["peak_bytes"][blocks]
print(f"largest block peak {peaks.max() / 1024:.1f} KiB (block {int(np.argmax(peaks))}); median of the last half "
      f"{np.median(peaks[len(peaks) // 2:]) / 1024:.1f} KiB; ratio {peaks.max() / np.median(peaks[len(peaks) // 2:]):.1f}x")
