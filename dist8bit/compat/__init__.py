"""Drop-in namespaces for code written against another library's API.

`dist8bit.compat.bitsandbytes` reproduces bitsandbytes' public optimizer,
`nn` and `functional` names, signatures, defaults and semantics on dist8bit's
own kernels, so a bitsandbytes script runs after one changed import line.
dist8bit's own classes (`dist8bit.optim`, `dist8bit.functional`) keep
torch's semantics where the two libraries differ; this package is where
bitsandbytes' choices live.
"""
