"""What ``collect`` makes of run folders, torch-free: records (reading), tables (study shapes),
failures (every run not done, with its reason), writers (markdown, CSV, JSON, terminal) and plots
(matplotlib, imported only when plotting)."""
