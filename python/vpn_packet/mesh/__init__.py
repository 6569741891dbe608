"""The mesh: membership signed by an authority key (`membership`), found through etcd (issue 21).

Nothing here is imported unless a command or a node's `[discovery]` asks for it.
"""
