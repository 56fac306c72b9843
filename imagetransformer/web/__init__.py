"""The local web app: the playground (`imagetransformer serve RUN`) and the human study
(`imagetransformer study serve STUDY_DIR`), on Starlette and uvicorn (the `web` extra).

Pages are plain HTML and JavaScript from `static/`, served by name from a fixed list; images are
either generated in memory or stimuli looked up by an opaque token, so nothing else on the disk
can be reached through the server.
"""
