python tools/zoo.py --source torchvision --check trained --memory-limit-gb 8 --timeout 600 --results docs/zoo-trained-results.jsonl
python tools/zoo.py --source timm --sample-every 3 --check trained --memory-limit-gb 8 --timeout 600 --results docs/zoo-trained-results.jsonl
python tools/zoo.py --redo --check trained --models torchvision:regnet_y_128gf timm:coatnet_5_224 timm:maxvit_xlarge_tf_224 timm:regnety_1280 timm:volo_d5_448 --memory-limit-gb 18 --timeout 900 --results docs/zoo-trained-results.jsonl
python tools/zoo.py --redo --check trained --models torchvision:regnet_y_128gf timm:coatnet_5_224 timm:regnety_1280 --memory-limit-gb 18 --timeout 900 --results docs/zoo-trained-results.jsonl
