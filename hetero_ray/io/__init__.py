"""Reading and writing: PEFT adapters, the protected atomic output, the one writer and its report, plots."""
