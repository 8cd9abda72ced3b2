# issue 16 (class kept) rows, swept on 2026-12-02 into docs/zoo-results.jsonl and moved here (the rows carrying class_kept):
# their statistics columns come from the BatchNorm-buffer bug of the input-size probe fixed after them (init='auto' saw trained BNs); pass/fail and class_kept are unaffected
python tools/zoo.py --source torchvision --redo --results docs/zoo-results.jsonl
python tools/zoo.py --source timm --sample-every 12 --redo --results docs/zoo-results.jsonl
python tools/zoo.py --redo --models torchvision:maxvit_t torchvision:regnet_y_128gf --memory-limit-gb 16 --timeout 900 --results docs/zoo-results.jsonl
python tools/zoo.py --redo --models timm:botnet26t_256 timm:eca_botnext26ts_256 timm:ghostnetv3_050 timm:halonet_h1 timm:legacy_seresnext101_32x4d timm:repghostnet_130 timm:sebotnet33ts_256 timm:coatnet_0_224 --memory-limit-gb 8 --timeout 600 --results docs/zoo-results.jsonl
# on the final code (functional dropout reverted, probe fixed):
python tools/zoo.py --redo --models timm:ghostnetv3_050 timm:repghostnet_130 timm:legacy_seresnext101_32x4d torchvision:resnet18 --memory-limit-gb 8 --timeout 600 --results docs/zoo-tree-results.jsonl
