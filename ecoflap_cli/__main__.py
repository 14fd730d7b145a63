from ecoflap_cli.cli.app import main

main()
