"""Applications built on the library: the single-image engine, cohort runs, the demo, the HTML report and the
MONAI Label / MONAI Deploy integrations. Import the module you need (nothing is imported here)."""
