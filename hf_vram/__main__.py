from hf_vram.cli import main

raise SystemExit(main())
