# rows of models not in the two sweeps below come from the earlier sweeps that README.md ("Model-zoo sweep") lists
python tools/zoo.py --source torchvision --redo --results docs/zoo-results.jsonl
python tools/zoo.py --source timm --sample-every 12 --redo --results docs/zoo-results.jsonl
# 2026-12-02 at commit 33e5c1c (corrections inside their consumers; the train/eval mode check), two workers; the models over 8 GiB again with 18
python tools/zoo.py --source torchvision --redo --jobs 2 --memory-limit-gb 8 --results docs/zoo-results.jsonl
python tools/zoo.py --source timm --sample-every 3 --redo --jobs 2 --memory-limit-gb 8 --results docs/zoo-results.jsonl
python tools/zoo.py --redo --models torchvision:regnet_y_128gf --memory-limit-gb 18 --timeout 900 --results docs/zoo-results.jsonl
python tools/zoo.py --redo --models timm:regnety_1280 timm:xcit_medium_24_p8_384 --memory-limit-gb 18 --timeout 900 --results docs/zoo-results.jsonl
