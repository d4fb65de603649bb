import re
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
TRL = ["trl>=1.16,<1.17", "peft>=0.21,<0.22"]
version = re.search(r'__version__ = "([^"]+)"', (here / "r3f_opt" / "__init__.py").read_text()).group(1)

setup(
    name="r3f-opt",
    version=version,
    description="R3F / R4F trust-region regularisers for fine-tuning pretrained transformers",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tested on 3.11; transformers 5 and TRL 1.16 (the [test] and [trl] extras) need it
    packages=["r3f_opt", "r3f_opt.methods", "r3f_opt.integrations", "r3f_opt.experiments", "r3f_opt.kernels"],
    # kernels/ is installed as r3f_opt.kernels: a top-level `kernels` would clash with a PyPI package.
    package_dir={"r3f_opt": "r3f_opt", "r3f_opt.kernels": "kernels"},
    install_requires=[
        "torch>=2.3",
        "transformers>=4.40",
        "accelerate>=1.1",  # transformers.Trainer (R3FTrainer) requires it
        "numpy",
        "filelock",  # r3f-finetune's output-folder lock, r3f-probe's cache-entry locks (installed with transformers)
        'triton; platform_system == "Linux"',
    ],
    entry_points={"console_scripts": [
        "r3f-finetune=r3f_opt.experiments.finetune:main",
        "r3f-report=r3f_opt.experiments.report:main",
        "r3f-probe=r3f_opt.experiments.probe:main",
    ]},
    extras_require={
        # R3FSFTTrainer (r3f_opt.integrations.trl): TRL's SFTTrainer, with PEFT for LoRA. Pinned to the minor
        # versions tested (it relies on SFTTrainer's compute_loss/metrics internals); both resolve with torch 2.13
        # and transformers 5.24 without changing them.
        "trl": TRL,
        # hypothesis: property-based kernel tests; matplotlib: the PNG plots of bench/ (tested in CI); TRL and PEFT:
        # tests/integrations/test_trl.py.
        "test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", *TRL],
        "bench": ["pytest-benchmark", "matplotlib"],
        "report": ["matplotlib"],  # r3f-report's PNG plot
    },
)
