"""The human feedback loop: labelling batches from the champion (batch), the labels database (store),
the annotation app (app, pages), simulated annotators (simulate), export to a data version (export),
agreement figures (agreement), the sample -> label -> export -> retrain loop (loop), and Label Studio
interop (labelstudio). See docs/feedback.md."""
