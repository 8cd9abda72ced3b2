# rows of models not in the two sweeps below come from the earlier sweeps that README.md ("Model-zoo sweep") lists
python tools/zoo.py --source torchvision --redo --results docs/zoo-results.jsonl
python tools/zoo.py --source timm --sample-every 12 --redo --results docs/zoo-results.jsonl
