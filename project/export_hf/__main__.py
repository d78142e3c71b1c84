"""`python -m project.export_hf CKPT OUT_DIR`: see project/export_hf/__init__.py."""

from project.export_hf import main

main()
