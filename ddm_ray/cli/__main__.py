from ddm_ray.cli import main

raise SystemExit(main())
