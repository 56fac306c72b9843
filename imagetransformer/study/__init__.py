"""The paper's human evaluation of super-resolution as a tool: stimuli made once and stored
(`stimuli`), answers in SQLite committed one by one (`store`), fool rates with Wilson intervals
(`report`). The web page that raters see is `imagetransformer.web.study`."""
