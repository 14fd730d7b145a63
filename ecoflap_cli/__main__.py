from ecoflap_cli.cli import main

main()
