"""Models of the SimLM recipe, one module each: ``biencoder`` (dense retriever), ``reranker``
(cross-encoder), ``pretrain`` (RLM encoder + bottleneck decoder). Import the module you need;
nothing is imported here so that each stays independent."""
