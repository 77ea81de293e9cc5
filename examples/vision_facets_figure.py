"""docs/vision-facets.png: three class units of the digits CNN, each row the means of its 3 facets
(left) and the images optimised from them (right).

Run: PYTHONPATH=src python examples/vision_facets_figure.py
"""
import torch

import actscope
from actscope.drawing.png import grid
from actscope.explain.image_examples import write_png
from actscope.explain.visualize import Target, VisConfig, facets
from actscope.zoo.digits import digit_images, load_digits_cnn

torch.set_num_threads(1)
model, images, tiles = actscope.wrap(load_digits_cnn()), digit_images(), []
for unit in (0, 3, 7):
    found = facets(model, Target("module:9@output", "channel", unit), images, k=3, top=60, code_site="module:7@output",
                   config=VisConfig(steps=64))
    for tile in [found.means[c] for c in range(3)] + [v.image for v in found.images]:
        tiles.append(tile.repeat_interleave(6, 1).repeat_interleave(6, 2).permute(1, 2, 0).numpy())
print(write_png("docs/vision-facets.png", grid(tiles, 6, pad=4), overwrite=True))
