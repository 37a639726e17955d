from gradsift.cli import app

app()
