"""MegaDual: train DualToken-style unified vision-language models at cluster scale.

Importing the package is cheap on purpose: no DeepSpeed, no compiled extension,
no process groups. Subpackages load what they need when they are used.
"""

__version__ = "0.1.0"
