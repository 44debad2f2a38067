"""Evaluation of a trained model on held-out shards.

Layered bottom-up, without cycles: ``embeddings`` (the one embeddings type and the loop that fills
it); ``labels`` (class names to ids); ``retrieval``, ``zeroshot`` and ``probe`` (the scores);
``classify`` (a fine-tuned classifier's scores, from its logits); ``report`` (PNGs and HTML); ``run``
(:func:`mmssl.eval.run.run_eval`, which uses them all).
"""
