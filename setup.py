"""Build script. Everything is declared in setup.cfg except the packages, which need code: the
repository's configs/ and callbacks/ folders are mapped into the package (see the comment in setup.cfg),
and the package's own data files (the papers' reported numbers) ship beside its modules."""

from setuptools import find_packages, setup

#: package -> source folder: the bundled YAML files, installed as fsad_lightning/bundled/<folder>/
BUNDLED = {"fsad_lightning.bundled.configs": "configs", "fsad_lightning.bundled.callbacks": "callbacks"}

setup(
    packages=find_packages(include=["fsad_lightning", "fsad_lightning.*"]) + list(BUNDLED),
    package_dir=BUNDLED,
    package_data={"fsad_lightning": ["paper_results.csv"], **{package: ["*.yaml"] for package in BUNDLED}},
)
