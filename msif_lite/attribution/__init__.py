"""Attributing answers to documents (notebooks 06–08): the method registry, the
`Attributor` that runs any registered method, candidate retrieval and `msif-lite trace`.

The registered methods, in registration order: the core methods of `methods`, then the
projected method of `projected` and the position-level variants and TracIn of `variants`
(notebook 11), loaded on the first read of `methods.METHODS`."""
