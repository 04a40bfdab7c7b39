"""From run folders to the paper's results grid: Tables 1-4 (CSV, Markdown) and Figures 2-3 (PNG)."""
