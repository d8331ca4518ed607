"""A model and a data set of your own, trained by train.py without touching p2p/ (docs/library.md):

    torchrun --standalone --nproc_per_node 4 train.py --config configs/quickstart.toml \\
        --model.name examples.my_model.nets:build --data.name examples.my_model.data:load
"""
