"""Tuneboard's library: fine-tune an ImageNet-pretrained image classifier on a folder of photos.

No Streamlit here: the dashboard (app.py, pages/) and the command line (python -m finetune_core)
are two front ends over the same modules.
"""
__version__ = "0.1.0"
