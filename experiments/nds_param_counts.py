"""Parameter counts of the published DARTS-family genotypes in DARTS's CIFAR-10 evaluation network.

DARTS's genotypes (cnn/genotypes.py of github.com/quark0/darts: DARTS-V1, DARTS-V2 and its transcriptions of
NASNet-A and AmoebaNet-A) built by ``gradsign.spaces.darts_model`` at 36 initial channels and 20 cells, and
at 16 channels and 8 cells, counted without the auxiliary head (as DARTS counts) and with it.

    python experiments/nds_param_counts.py
"""
from __future__ import annotations

from gradsign.spaces.darts_model import AMOEBANET_A, DARTS_V1, DARTS_V2, NASNET_A, build_darts, param_count

GENOTYPES = {"DARTS-V2": DARTS_V2, "DARTS-V1": DARTS_V1, "NASNet-A": NASNET_A, "AmoebaNet-A": AMOEBANET_A}


def main() -> None:
    print("| genotype | width | depth | params without aux head | with aux head | millions (without) |")
    print("|---|---|---|---|---|---|")
    for name, genotype in GENOTYPES.items():
        for width, depth in ((36, 20), (16, 8)):
            model = build_darts(genotype, num_classes=10, width=width, depth=depth, auxiliary=True)
            without = param_count(model, auxiliary=False)
            print(f"| {name} | {width} | {depth} | {without:,} | {param_count(model):,} | {without / 1e6:.2f}M |")


if __name__ == "__main__":
    main()
