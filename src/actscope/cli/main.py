"""``actscope``: the entry point; each command lives in its own module."""
from __future__ import annotations

import typer

from . import compare as compare_command
from . import attention as attention_command
from . import contrast as contrast_command
from . import encode as encode_command
from . import decode as decode_command
from . import discriminate as discriminate_command
from . import env as env_command
from . import examples as examples_command
from . import filters as filters_command
from . import generate as generate_command
from . import harvest as harvest_command
from . import lens as lens_command
from . import patch as patch_command
from . import profile as profile_command
from . import query as query_command
from . import report as report_command
from . import sae as sae_command
from . import sites as sites_command
from . import sparsify as sparsify_command
from . import steer as steer_command
from . import visualize as visualize_command

app = typer.Typer(
    name="actscope",
    help="See, measure, explain and exploit the neuron activations of any PyTorch model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# see and measure
app.command("profile")(profile_command.profile)
app.command("report")(report_command.report)
app.command("query")(query_command.query)
app.command("sites")(sites_command.sites)
app.command("harvest")(harvest_command.harvest)
app.command("train-sae")(sae_command.train_sae)
# explain and edit
app.command("decode")(decode_command.decode)
app.command("examples")(examples_command.examples)
app.command("visualize")(visualize_command.visualize)
app.command("discriminate")(discriminate_command.discriminate)
app.command("filters")(filters_command.filters)
app.command("contrast")(contrast_command.contrast)
app.command("patch")(patch_command.patch)
app.command("steer")(steer_command.steer)
app.command("lens")(lens_command.lens)
app.command("attention")(attention_command.attention)
app.command("compare")(compare_command.compare)
app.command("encode")(encode_command.encode)
# exploit sparsity
app.command("sparsify")(sparsify_command.sparsify)
app.command("generate")(generate_command.generate)
app.command("env")(env_command.env)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
