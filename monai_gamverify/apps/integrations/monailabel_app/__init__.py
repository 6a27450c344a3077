"""The MONAI Label app shipped with monai-gamverify: ``main.py`` here is what ``monailabel start_server --app`` loads.

Write a copy with ``python -m monai_gamverify.apps.integrations.monailabel app --out apps/gamverify``; importing
``main`` needs MONAI Label.
"""
