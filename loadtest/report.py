# placeholder
def write_report(result, path):
    path.write_text("<html></html>")
